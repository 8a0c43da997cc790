# Tied looping on Tiny Shakespeare: 6 unique blocks, the middle three (centre 2, radius 1)
# applied twice as one unit -> effective depth 9 with the parameters of a 6-layer model.
# The pre-loop representation re-enters by addition at every iteration after the first.
#   blockloop train config/train_shakespeare_char_loop_tied.py
# Compare with config/train_shakespeare_char.py (parameter-matched, depth 6) and the same
# file with --n_layer=9 (depth-matched).

out_dir = "out-shakespeare-char-loop-tied"
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

loop_center_idx = 2
loop_radius = 1
max_loops = 2
tied_looping = True
loop_input_injection = "add"
eval_loops = [1, 2, 3, 4]  # test-time loop scaling, logged to metrics.jsonl

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

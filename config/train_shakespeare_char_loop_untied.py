# Untied looping on Tiny Shakespeare: blocks 2, 3 and 4 (centre 3, radius 1) each applied
# twice on their own, in order (2, 2, 3, 3, 4, 4) -> effective depth 9 with 6 unique blocks.
# Concat injection: each looped block has an adapter A([s; x0]) that starts as pass-through.
#   blockloop train config/train_shakespeare_char_loop_untied.py

out_dir = "out-shakespeare-char-loop-untied"
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

loop_center_idx = 3
loop_radius = 1
max_loops = 2
tied_looping = False
loop_input_injection = "concat"
eval_loops = [1, 2, 3, 4]

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

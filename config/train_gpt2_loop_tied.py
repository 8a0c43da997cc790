# A looped GPT-2 small on OpenWebText, tied: 6 unique blocks reaching GPT-2's depth of 12.
# Blocks 1, 2, 3 (centre 2, radius 1) run as one unit three times: 0, (1 2 3) x 3, 4, 5, so the
# effective depth is n_layer + 3 x (max_loops - 1) = 6 + 3 x 2 = 12. The pre-loop representation
# is added back at every iteration after the first ("add").
#   torchrun --standalone --nproc_per_node=8 -m blockloop.train config/train_gpt2_loop_tied.py
# Compare with config/train_gpt2.py (depth-matched, 12 unique blocks, 123.6M parameters) and
# with config/train_gpt2_loop_untied.py (same depth and parameters, different block order).
# Everything but the model keys is train_gpt2.py's recipe (base_config).
#
# Parameters: 81.1M (6 blocks x 7.1M + 38.6M token embedding/head). FLOPs per token are GPT-2
# small's (12 block applications), so an iteration costs about as much compute as train_gpt2.py.
# Tokens per iteration: 12 x 1024 x 40 = 491,520, 5 micro-steps per rank on 8 GPUs.
#
# Memory per GPU, an estimate (not measured; method in train_gpt2.py): weights, gradients and
# AdamW moments 81.1M x 16 bytes = ~1.3 GB. Activations are stored per block *application*,
# so a looped block stores them once per iteration: 12 applications x ~0.32 GB = ~3.9 GB, as
# GPT-2 small, plus ~2.5-6 GB of logits: ~9-11 GB in all. Looping saves parameters, not
# activations; --loop_checkpointing=True keeps only the input of each looped iteration (~38 MB
# in fp32) and recomputes the rest in the backward pass: ~2.5 GB less, for one extra forward of
# the looped blocks.
base_config = "train_gpt2.py"

out_dir = "out-gpt2-loop-tied"
wandb_run_name = "gpt2-loop-tied"
n_layer = 6
loop_center_idx = 2
loop_radius = 1
max_loops = 3
tied_looping = True
loop_input_injection = "add"
eval_loops = [1, 2, 3, 4, 6]  # test-time loop scaling, logged at each evaluation

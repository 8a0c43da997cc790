# A looped GPT-2 small on OpenWebText, untied: 6 unique blocks reaching GPT-2's depth of 12.
# Blocks 1, 2, 3 (centre 2, radius 1) each run three times on their own, in order:
# 0, 1 1 1, 2 2 2, 3 3 3, 4, 5, so the effective depth is 6 + 3 x (max_loops - 1) = 12.
# Same blocks, depth, parameters and injection ("add") as config/train_gpt2_loop_tied.py: the
# two differ only in the order the looped blocks are applied.
#   torchrun --standalone --nproc_per_node=8 -m blockloop.train config/train_gpt2_loop_untied.py
#
# Parameters: 81.1M; FLOPs per token as GPT-2 small. Tokens per iteration: 12 x 1024 x 40 =
# 491,520. Memory per GPU, an estimate (not measured; method in train_gpt2.py): as the tied
# variant, ~1.3 GB of weights, gradients and AdamW moments plus ~3.9 GB of block activations
# (12 applications) and ~2.5-6 GB of logits, ~9-11 GB in all.
base_config = "train_gpt2.py"

out_dir = "out-gpt2-loop-untied"
wandb_run_name = "gpt2-loop-untied"
n_layer = 6
loop_center_idx = 2
loop_radius = 1
max_loops = 3
tied_looping = False
loop_input_injection = "add"
eval_loops = [1, 2, 3, 4, 6]  # test-time loop scaling, logged at each evaluation

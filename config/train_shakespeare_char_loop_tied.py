# Tied looping on Tiny Shakespeare: nanoGPT's 6x384 character model, with the middle three
# blocks (centre 2, radius 1) applied twice as one unit: 0 1, (2 3 4) x 2, 5 -> effective depth
# 9 with the parameters of the 6-layer model. The pre-loop representation re-enters by addition.
#   blockloop train config/train_shakespeare_char_loop_tied.py
# References: config/train_shakespeare_char.py (parameter-matched, depth 6) and the same file
# with --n_layer=9 (depth-matched).
base_config = "train_shakespeare_char.py"

out_dir = "out-shakespeare-char-loop-tied"
loop_center_idx = 2
loop_radius = 1
max_loops = 2
tied_looping = True
loop_input_injection = "add"
eval_loops = [1, 2, 3, 4]  # test-time loop scaling, logged to metrics.jsonl

# Untied looping on Tiny Shakespeare: blocks 2, 3 and 4 (centre 3, radius 1) each applied twice
# on their own, in order: 0 1, 2 2, 3 3, 4 4, 5 -> effective depth 9 with 6 unique blocks.
# Concat injection: each looped block has an adapter A([s; x0]) that starts as pass-through.
#   blockloop train config/train_shakespeare_char_loop_untied.py
base_config = "train_shakespeare_char.py"

out_dir = "out-shakespeare-char-loop-untied"
loop_center_idx = 3
loop_radius = 1
max_loops = 2
tied_looping = False
loop_input_injection = "concat"
eval_loops = [1, 2, 3, 4]

# Two loop groups with their own iteration counts (the seed project's later layout): blocks 1-2
# looped 3 times as one unit, block 3 looped twice, blocks 0 and 4-5 once:
#   0, (1 2) x 3, (3) x 2, 4 5  -> effective depth 6 + 2*2 + 1*1 = 11
#   blockloop train config/train_shakespeare_char_two_groups.py
# Evaluating at other counts takes one number for every group (--eval_loops) or, in the
# Python API, a list per group (model(idx, num_loops=[4, 2])).
base_config = "train_shakespeare_char.py"

out_dir = "out-shakespeare-char-two-groups"
loop_groups = [[1, 2], [3, 3]]
loop_counts = [3, 2]
tied_looping = True
loop_input_injection = "add"
eval_loops = [1, 2, 4]

# Huginn-shaped prelude / recurrent core / coda on Tiny Shakespeare (Geiping et al. 2025,
# "Scaling up test-time compute with latent reasoning: a recurrent depth approach"): 8 blocks,
# blocks 0-1 the prelude, blocks 2-5 a 4-block core looped as one unit, blocks 6-7 the coda.
# The core starts from noise and re-reads the prelude's output by concatenation at every
# iteration, is normalised on entry, and is trained with random iteration counts (mean 4):
#   0 1, (2 3 4 5) x T, 6 7  -> effective depth 8 + 4 (T - 1) = 20 at T = 4
#   blockloop train config/train_shakespeare_char_huginn.py
base_config = "train_shakespeare_char.py"

out_dir = "out-shakespeare-char-huginn"
n_layer = 8
loop_groups = [[2, 5]]
max_loops = 4
tied_looping = True
loop_input_injection = "concat"
loop_state_init = "noise"
loop_noise_scale = 1.0
loop_state_norm = "layernorm"
loop_sampling = "poisson_lognormal"
eval_loops = [1, 2, 4, 8, 16]

# nanoGPT's 6x384 character model on Tiny Shakespeare with rotary position embeddings (RoPE,
# Su et al. 2021) instead of learned absolute ones: everything else is
# config/train_shakespeare_char.py, so the two runs compare the position encodings alone.
#   blockloop train config/train_shakespeare_char_rope.py
# RoPE has no position parameters (the model is 256 x 384 = 98k parameters smaller), and its
# generation cache rolls past block_size (README "Sampling: the KV cache and generation past block_size").
base_config = "train_shakespeare_char.py"

out_dir = "out-shakespeare-char-rope"
wandb_run_name = "mini-gpt-rope"
position_embedding = "rope"

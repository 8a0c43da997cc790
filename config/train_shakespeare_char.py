# A small character-level GPT on Tiny Shakespeare: nanoGPT's config of the same name
# (6 layers x 384 channels, context 256). About 10M parameters; meant for a GPU.
# CPU quick version (nanoGPT's README "baby" run):
#   blockloop train config/train_shakespeare_char.py --device=cpu --compile=False \
#     --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 \
#     --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

out_dir = "out-shakespeare-char"
eval_interval = 250  # the model overfits on this small data, so evaluate often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep only checkpoints that improve validation loss

wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small models can take a larger rate
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a little larger because there are few tokens per iteration
warmup_iters = 100

# Loop the middle of pretrained GPT-2 and fine-tune it on Tiny Shakespeare (GPT-2 BPE tokens).
# GPT-2 small's blocks 4, 5, 6 (centre 5, radius 1) run twice as one unit: 0..3, (4 5 6) x 2,
# 7..11, effective depth 12 + 3 = 15, same 124M parameters. From the second iteration on the
# pre-loop representation is added back ("add"); the first iteration is GPT-2 unchanged, so
# val_loss@1 below is the fine-tuned model without its loop.
#   blockloop prepare shakespeare        # writes data/shakespeare (GPT-2 BPE)
#   blockloop train config/finetune_shakespeare_loop.py
# init_from may also be a local directory saved by transformers' save_pretrained (offline), or
# gpt2-medium / gpt2-large / gpt2-xl with a centre near their middle (n_layer 24 / 36 / 48).
# Settings follow nanoGPT's finetune_shakespeare.py: small constant learning rate, evaluation
# every few steps, only improving checkpoints kept.
#
# Tokens per iteration: batch_size 1 x block_size 1024 x gradient_accumulation_steps 32 =
# 32,768; the ~300k training tokens (301,966 in nanoGPT's, 322,778 in the offline stand-in)
# are ~10 iterations per epoch, so 50 iterations is ~5 epochs (best.pt keeps the best
# validation loss if it starts to overfit).
# Memory, an estimate (not measured; method in train_gpt2.py): 124.4M parameters x 16 bytes
# (fp32 weights, gradients, AdamW moments) = ~2.0 GB; activations of one 1 x 1024 micro-batch
# ~34 bytes x 1024 x 768 = ~27 MB per block application x 15 = ~0.4 GB in bf16, plus the
# logits (1024 x 50257 in fp32, ~0.2 GB, briefly ~0.5 GB): ~3 GB on a GPU. In fp32 on a CPU
# (the default there) activations double, ~3.5 GB of RAM, at a few seconds per micro-step.

out_dir = "out-shakespeare-loop"
eval_interval = 5
eval_iters = 40
log_interval = 1
always_save_checkpoint = False
wandb_log = False
wandb_project = "shakespeare"
wandb_run_name = "ft-gpt2-loop"

init_from = "gpt2"
dataset = "shakespeare"
batch_size = 1
block_size = 1024
gradient_accumulation_steps = 32

# Only looping keys apply on top of pretrained weights (the architecture is GPT-2's).
loop_center_idx = 5
loop_radius = 1
max_loops = 2
tied_looping = True
loop_input_injection = "add"
eval_loops = [1, 2, 3]

learning_rate = 3e-5
decay_lr = False  # constant rate
min_lr = 3e-6  # unused without decay, but must not exceed learning_rate
max_iters = 50

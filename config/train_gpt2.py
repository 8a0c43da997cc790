# GPT-2 small (124M) on OpenWebText: nanoGPT's recipe, for 8 GPUs on one node.
#   blockloop prepare openwebtext --num_proc=8
#   torchrun --standalone --nproc_per_node=8 -m blockloop.train config/train_gpt2.py
# Two nodes, multi-node flags and NCCL notes: docs/SCALING.md.
#
# Tokens per iteration: batch_size 12 x block_size 1024 x gradient_accumulation_steps 40
# = 491,520 (~0.5M, as GPT-2/GPT-3 small); each of 8 ranks runs 5 micro-steps of 12 x 1024.
# 600,000 iterations = ~295B tokens. nanoGPT reports ~2.85 val loss after ~4 days on 8 A100s.
#
# Memory per GPU, an estimate from counting tensors (not measured): 123.6M parameters x 16
# bytes (fp32 weights, gradients and AdamW's two moments) = ~2.0 GB. Activations of one
# micro-batch in bf16 autocast: ~34 bytes x seq 1024 x batch 12 x width 768 per block
# (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
# without their attention-score term because SDPA's fused kernels do not store the T x T
# matrix) = ~0.32 GB x 12 blocks = ~3.9 GB, plus the logits: 12 x 1024 x 50304 values kept in
# fp32 for the loss (~2.5 GB), briefly ~6 GB with their bf16 and fp32 copies. So ~10-12 GB in
# all; lower batch_size (and raise gradient_accumulation_steps to keep 491,520) on smaller GPUs.

out_dir = "out-gpt2"
eval_interval = 1000
eval_iters = 200
log_interval = 10
wandb_log = False  # True to log to Weights & Biases (pip install 'blockloop[online]')
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

dataset = "openwebtext"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# GPT-2 small; vocab 50257 padded to 50304 (a multiple of 64) for faster matmuls, as nanoGPT.
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50304
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5  # learning_rate / 10 (Chinchilla)
warmup_iters = 2000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

compile = True

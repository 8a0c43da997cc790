"""Hugging Face GPT-2 import: same logits as transformers' own model, looping, file layouts.

No GPT-2 weights are reachable offline, so each test builds a small randomly initialised
`GPT2LMHeadModel`, saves it the way `save_pretrained` (or the hub) does, and compares with
transformers' forward pass, run in eager attention so that the reference is an explicit
softmax rather than the SDPA kernel our model also uses.
"""

import json
import sys

import pytest
import torch

from blockloop.checkpoint import CheckpointError
from blockloop.config import ConfigError
from blockloop.model import GPT, GPTConfig
from blockloop.pretrained import from_pretrained, load_pretrained
from tests.conftest import read_metrics, run, write_token_dataset

# transformers is in the `dev` extra; the loader itself does not need it.
transformers = pytest.importorskip("transformers")

N_LAYER, N_HEAD, N_EMBD, N_POSITIONS, VOCAB = 3, 4, 32, 64, 50257
# float32 rounding on logits of magnitude ~30; the GELU mismatch checked below is ~1e-2.
TOL = dict(atol=1e-4, rtol=1e-5)


def hf_gpt2(n_layer=N_LAYER, seed=0):
    """A GPT-2 with weights large enough for the activation's shape to matter.

    At GPT-2's init (std 0.02) the MLP inputs are so small that exact and tanh GELU give logits
    within ~3e-6 of each other, inside the tolerance, so a wrong activation would pass; std 0.3
    weights move them into the range where the two differ (by ~1e-2 in the logits).
    """
    config = transformers.GPT2Config(
        n_layer=n_layer, n_head=N_HEAD, n_embd=N_EMBD, n_positions=N_POSITIONS, vocab_size=VOCAB,
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_((1.0 if name.endswith(("wte.weight", "wpe.weight")) else 0.3) * noise)
    return model


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def tokens(seed=1, batch=2, length=N_POSITIONS):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def our_logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx, idx)[0]


def test_save_pretrained_directory_gives_transformers_logits(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    model = GPT.from_pretrained(str(tmp_path / "hf"))
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (
        N_LAYER, N_HEAD, N_EMBD, N_POSITIONS, VOCAB)
    assert cfg.bias and cfg.gelu_approximate == "tanh" and cfg.loop_center_idx == -1
    idx = tokens()
    ref = hf_logits(hf, idx)
    torch.testing.assert_close(our_logits(model, idx), ref, **TOL)
    # The comparison can tell GELU variants apart: the same weights with nanoGPT's exact GELU
    # are off by far more than the tolerance.
    exact = GPT(GPTConfig(**{**cfg.to_dict(), "gelu_approximate": "none"}))
    exact.load_state_dict(model.state_dict())
    assert (our_logits(exact, idx) - ref).abs().max() > 100 * TOL["atol"]


def test_looping_the_middle_block_equals_the_unrolled_stack(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    looped = from_pretrained(tmp_path / "hf", loop_center_idx=1, max_loops=3)
    assert looped.effective_depth() == 5
    # Independent computation: transformers' own model with block 1 copied three times.
    unrolled = hf_gpt2(n_layer=5)
    with torch.no_grad():
        for name in ("wte", "wpe", "ln_f"):
            source = getattr(hf.transformer, name).state_dict()
            getattr(unrolled.transformer, name).load_state_dict(source)
        for i, j in enumerate([0, 1, 1, 1, 2]):
            unrolled.transformer.h[i].load_state_dict(hf.transformer.h[j].state_dict())
    idx = tokens(seed=2)
    ref = hf_logits(unrolled, idx)
    torch.testing.assert_close(our_logits(looped, idx), ref, **TOL)
    unlooped = our_logits(from_pretrained(tmp_path / "hf"), idx)
    assert (unlooped - ref).abs().max() > 100 * TOL["atol"]


def test_hub_layout_bin_file_and_sharded_safetensors(tmp_path):
    hf = hf_gpt2()
    idx = tokens(seed=3)
    ref = hf_logits(hf, idx)
    # The layout of the hub's original GPT-2 uploads: the bare GPT2Model (no "transformer."
    # prefix), attention buffers included, as pytorch_model.bin.
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(hf.config.to_dict()))
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
             if k.startswith("transformer.")}
    mask = torch.tril(torch.ones(N_POSITIONS, N_POSITIONS)).view(1, 1, N_POSITIONS, N_POSITIONS)
    for i in range(N_LAYER):
        state[f"h.{i}.attn.bias"] = mask
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, hub / "pytorch_model.bin")
    torch.testing.assert_close(our_logits(load_pretrained(str(hub)), idx), ref, **TOL)
    # Large models are saved in shards behind an index.
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = load_pretrained(str(tmp_path / "sharded"))
    torch.testing.assert_close(our_logits(sharded, idx), ref, **TOL)


def test_online_name_goes_through_transformers(monkeypatch):
    hf = hf_gpt2()
    asked = []

    def fake_from_pretrained(name):
        asked.append(name)
        return hf

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", fake_from_pretrained)
    model = load_pretrained("gpt2-medium", loop_center_idx=1, loop_radius=1, max_loops=2)
    assert asked == ["gpt2-medium"]
    assert model.loop_plan.start == 0 and model.loop_plan.stop == 3
    idx = tokens(seed=4)
    plain = from_pretrained("gpt2")
    torch.testing.assert_close(our_logits(plain, idx), hf_logits(hf, idx), **TOL)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'blockloop\[online\]'"):
        from_pretrained("gpt2")


def test_unsupported_or_unsafe_files_are_refused(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    relu = {**config, "activation_function": "relu"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(relu))
    with pytest.raises(CheckpointError, match="activation_function='relu'"):
        from_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match="only looping keys"):
        from_pretrained(tmp_path / "hf", n_layer=6)
    with pytest.raises(ConfigError, match="gpt2-xl"):
        load_pretrained(str(tmp_path / "nothing-here"))
    # A .bin file that would run code when unpickled is refused before anything runs.
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps(config))

    class RunsCode:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"transformer.wte.weight": RunsCode()}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        from_pretrained(evil)


def test_training_fine_tunes_a_looped_hf_gpt2_and_resumes(tmp_path):
    hf_gpt2().save_pretrained(tmp_path / "hf")
    data = write_token_dataset(tmp_path / "data")
    out = tmp_path / "out"
    args = [f"--data_dir={data}", f"--out_dir={out}", "--dataset=tiny", "--batch_size=2",
            "--block_size=16", "--eval_iters=1", "--eval_interval=2", "--learning_rate=1e-4",
            "--warmup_iters=0", "--lr_decay_iters=4", "--min_lr=1e-5", "--progress=False",
            "--gradient_accumulation_steps=1", "--device=cpu", f"--init_from={tmp_path / 'hf'}",
            "--loop_center_idx=1", "--max_loops=2", "--loop_input_injection=add"]
    run(args + ["--max_iters=2"])
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["gelu_approximate"] == "tanh" and saved["block_size"] == 16
    assert saved["loop_center_idx"] == 1 and saved["n_layer"] == N_LAYER
    resume = [a for a in args if not a.startswith("--init_from=")]
    result = run(resume + ["--init_from=resume", "--max_iters=4"])
    assert result.iter_num == 4
    assert [r["iter"] for r in read_metrics(out) if r["kind"] == "eval"] == [0, 2, 4]

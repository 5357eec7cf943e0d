"""easy_context.adapters: LoRA extraction from a fine-tune and merging with the long-context config carried along.

Round trip on tiny Llama and Qwen2 built from configs: tuned = base + a known rank-4 delta on every linear layer
(the LM head included) + a new RoPE base and max_position_embeddings. Extraction at rank 4 recovers each delta to
relative 1e-4; PEFT loads the adapter (and its merge equals ours); the merged model's logits equal the tuned model's
(relative 1e-4) at a length beyond the base's max_position_embeddings; the merged config carries the tuned RoPE
values. Also: tied embeddings, biases and norms, rank by energy, include/exclude, bf16, both config spellings,
errors for bad inputs (one line naming the tensor, exit code 2), and the memory bound of extraction.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from reference import BF16_TOL, DIFFERS, MODEL_TOL, rel_err
from tiny_models import tiny_model

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from easy_context.adapters import AdapterError, AdapterWarning, apply_adapter, extract_lora, truncated_svd  # noqa: E402
from easy_context.adapters import longcontext as lc  # noqa: E402
from easy_context.adapters.__main__ import main as cli_main  # noqa: E402
from easy_context.training import get_rope_theta, set_rope_theta  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE_MAX_POS, TUNED_MAX_POS = 64, 256
BASE_THETA, TUNED_THETA = 10_000.0, 1_000_000.0
EVAL_LEN = 160  # beyond the base's 64 positions
PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------------- helpers


def _known_delta(shape, rank, gen, scale=0.07, decay=1.0):
    out, inp = shape
    left = torch.randn(out, rank, generator=gen) * scale * decay ** torch.arange(rank)
    return left @ (torch.randn(rank, inp, generator=gen) * scale)


def make_pair(root: Path, family: str, *, tie=False, rope=True, embed_delta=False, bias_delta=False,
              norm_delta=False, rank=4, decaying=False, seed=1, **overrides):
    """Save a base and a tuned tiny model; return (base_dir, tuned_dir, {module: known ΔW})."""
    base = tiny_model(family, max_position_embeddings=BASE_MAX_POS, rope_theta=BASE_THETA, tie_word_embeddings=tie,
                      **overrides)
    base.save_pretrained(root / "base")
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    known = {}
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if isinstance(module, nn.Linear) and not (tie and name == "lm_head"):
                decay = 0.2 + 0.7 * torch.rand((), generator=gen).item() if decaying else 1.0
                known[name] = _known_delta(module.weight.shape, rank, gen, decay=decay)
                module.weight += known[name]
                if bias_delta and module.bias is not None:
                    module.bias += 0.01 * torch.randn(module.bias.shape, generator=gen)
            elif isinstance(module, nn.Embedding) and embed_delta:
                known[name] = _known_delta(module.weight.shape, rank, gen)
                module.weight += known[name]
            elif norm_delta and "norm" in type(module).__name__.lower():
                module.weight += 0.05 * torch.randn(module.weight.shape, generator=gen)
    if rope:
        set_rope_theta(tuned.config, TUNED_THETA)
        tuned.config.max_position_embeddings = TUNED_MAX_POS
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned", known


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, length=EVAL_LEN, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def factors(adapter, module):
    sd = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    key = PREFIX + module
    if key + ".lora_A.weight" in sd:
        return sd[key + ".lora_B.weight"].double() @ sd[key + ".lora_A.weight"].double()
    return (sd[key + ".lora_embedding_B"].double() @ sd[key + ".lora_embedding_A"].double()).t()


def quiet_extract(*args, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("log", None)
    return extract_lora(*args, **kwargs)


def quiet_apply(*args, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("log", None)
    return apply_adapter(*args, **kwargs)


def cli_in_process(capsys, *args):
    """The command line's main() in this process: (exit code, stdout, stderr) as a CompletedProcess."""
    capsys.readouterr()  # drop what was printed before
    code = cli_main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "easy_context.adapters", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def peft_model(base_dir, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(load(base_dir), str(adapter)).eval()


# ---------------------------------------------------------------------------------------------------- the SVD


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_truncated_svd_is_the_best_rank_r_approximation(shape):
    gen = torch.Generator().manual_seed(0)
    # A spectrum that decays: the optimal rank-r error is known from the full SVD (Eckart–Young).
    u, _ = torch.linalg.qr(torch.randn(shape[0], 40, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], 40, generator=gen, dtype=torch.float64))
    s = 0.8 ** torch.arange(40, dtype=torch.float64)
    delta = ((u * s) @ v.t()).float()
    full = torch.linalg.svdvals(delta.double())
    for r in (1, 5, 12):
        low = truncated_svd(delta, r)
        assert low.A.shape == (r, shape[1]) and low.B.shape == (shape[0], r)
        assert torch.allclose(low.singular_values, full[:r], rtol=1e-6)
        optimal = (full[r:] ** 2).sum().sqrt() / full.norm()
        achieved = (delta.double() - low.B @ low.A).norm() / delta.double().norm()
        assert abs(achieved - optimal) < 1e-6 and abs(low.rel_residual - achieved) < 1e-6
        assert abs(low.energy - (full[:r] ** 2).sum() / (full ** 2).sum()) < 1e-9
    # Energy picks the smallest rank keeping the fraction; the numerical rank caps the rank.
    low = truncated_svd(delta, 40, energy=0.9)
    cumulative = (full ** 2).cumsum(0) / (full ** 2).sum()
    assert low.A.shape[0] == int((cumulative < 0.9).sum()) + 1
    exact4 = _known_delta(shape, 4, gen)
    assert truncated_svd(exact4, 16).A.shape[0] == 4
    assert truncated_svd(torch.zeros(shape), 4) is None


# ---------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_round_trip(tmp_path, family):
    base_dir, tuned_dir, known = make_pair(tmp_path, family)
    assert "lm_head" in known and len(known) == 2 * 7 + 1  # 7 linears per layer and the LM head
    adapter = tmp_path / "adapter"
    report = quiet_extract(base_dir, tuned_dir, adapter, 4)

    # Every known delta is recovered at rank 4.
    assert report["ranks"] == {4: len(known)}
    for module, delta in known.items():
        err = rel_err(factors(adapter, module), delta)
        assert err <= MODEL_TOL, f"{module}: relative error {err:.2e}"
    assert report["largest_residual"]["rel_residual"] <= MODEL_TOL
    assert report["retained_energy_overall"] > 1 - 1e-8
    sidecar = json.loads((adapter / "long_context.json").read_text())
    assert sidecar["tuned"]["summary"]["rope_theta"] == TUNED_THETA
    assert sidecar["tuned"]["summary"]["max_position_embeddings"] == TUNED_MAX_POS
    assert sidecar["base"]["summary"]["rope_theta"] == BASE_THETA

    # PEFT loads it: the factors land in the LoRA layers, and PEFT's merge equals ours.
    pm = peft_model(base_dir, adapter)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.allclose(q.lora_B["default"].weight @ q.lora_A["default"].weight * q.scaling["default"],
                          factors(adapter, "model.layers.0.self_attn.q_proj").float(), atol=1e-7)
    merged_dir = tmp_path / "merged"
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterWarning)  # the target is the adapter's base: nothing to warn about
        info = quiet_apply(base_dir, adapter, merged_dir)
    ours = load_file(str(merged_dir / "model.safetensors"))
    theirs = pm.merge_and_unload().state_dict()
    assert set(ours) <= set(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6

    # The merged model is the tuned model, RoPE included, beyond the base's positions.
    merged, tuned = load(merged_dir), load(tuned_dir)
    assert get_rope_theta(merged.config) == TUNED_THETA
    assert merged.config.max_position_embeddings == TUNED_MAX_POS
    assert info["config"]["rope_theta"] == TUNED_THETA
    ref = logits(tuned)
    err = rel_err(logits(merged), ref)
    assert err <= MODEL_TOL, f"merged vs tuned logits: relative error {err:.2e}"
    # ... which needs the carried RoPE base: the merged weights with the base's RoPE are another model.
    plain = load(merged_dir)
    set_rope_theta(plain.config, BASE_THETA)
    plain = AutoModelForCausalLM.from_config(plain.config, dtype=torch.float32).eval()
    plain.load_state_dict(merged.state_dict())
    assert rel_err(logits(plain), ref) > DIFFERS  # 10x the tolerance; the merge itself is at ~1e-7
    # Tokenizer-less tiny models still get their generation config copied.
    assert (merged_dir / "generation_config.json").is_file()


def test_lower_rank_keeps_the_top_directions(tmp_path):
    base_dir, tuned_dir, known = make_pair(tmp_path, "llama", rope=False)
    report = quiet_extract(base_dir, tuned_dir, tmp_path / "a2", 2)
    assert report["ranks"] == {2: len(known)}
    for module, delta in known.items():
        entry = next(m for m in report["modules"] if m["module"] == module)
        s = torch.linalg.svdvals(delta.double())
        optimal = ((s[2:] ** 2).sum() / (s ** 2).sum()).sqrt().item()
        assert abs(entry["rel_residual"] - optimal) < 1e-5
        assert abs(rel_err(factors(tmp_path / "a2", module), delta) - optimal) < 1e-5


# ---------------------------------------------------------------------------------------------------- variants


def test_tied_embeddings_lora(tmp_path):
    """A tied LM head: the embedding's change is extracted once (embedding factors) and merged once."""
    base_dir, tuned_dir, known = make_pair(tmp_path, "llama", tie=True, embed_delta=True)
    adapter = tmp_path / "adapter"
    report = quiet_extract(base_dir, tuned_dir, adapter, 4)
    actions = {m["module"]: m["action"] for m in report["modules"]}
    assert actions["lm_head"] == "tied" and actions["model.embed_tokens"] == "lora"
    assert rel_err(factors(adapter, "model.embed_tokens"), known["model.embed_tokens"]) <= MODEL_TOL
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True

    tuned = load(tuned_dir)
    # PEFT's unmerged model applies the tied change on both sides (same RoPE as the base for this comparison).
    same_rope = load(tuned_dir)
    set_rope_theta(same_rope.config, BASE_THETA)
    same_rope = AutoModelForCausalLM.from_config(same_rope.config, dtype=torch.float32).eval()
    same_rope.load_state_dict(tuned.state_dict())
    pm = peft_model(base_dir, adapter)
    assert rel_err(logits(pm, 48), logits(same_rope, 48)) <= MODEL_TOL

    quiet_apply(base_dir, adapter, tmp_path / "merged")
    merged = load(tmp_path / "merged")
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    assert rel_err(logits(merged), logits(tuned)) <= MODEL_TOL


def test_tuned_model_that_unties_the_embeddings(tmp_path):
    """Base ties the LM head to the embedding, the fine-tune stores its own: the merged model is untied."""
    base = tiny_model("llama", tie_word_embeddings=True, max_position_embeddings=BASE_MAX_POS)
    base.save_pretrained(tmp_path / "base")
    tuned = tiny_model("llama", tie_word_embeddings=False, max_position_embeddings=BASE_MAX_POS)
    tuned.load_state_dict(base.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        tuned.lm_head.weight.copy_(base.lm_head.weight + _known_delta(tuned.lm_head.weight.shape, 4, gen))
        tuned.model.embed_tokens.weight += _known_delta(tuned.model.embed_tokens.weight.shape, 4, gen)
    tuned.save_pretrained(tmp_path / "tuned")
    report = quiet_extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter", 4)
    actions = {m["module"]: m["action"] for m in report["modules"]}
    assert actions["lm_head"] == "lora" and actions["model.embed_tokens"] == "lora"
    info = quiet_apply(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert info["untied"] == ["lm_head.weight"]
    merged = load(tmp_path / "merged")
    assert not merged.config.tie_word_embeddings
    assert rel_err(logits(merged, 48), logits(load(tmp_path / "tuned"), 48)) <= MODEL_TOL


def test_merges_adapters_made_by_peft(tmp_path):
    """An adapter trained with PEFT (rsLoRA scaling, lora_bias, a rank pattern, modules_to_save) merges as PEFT's
    merge_and_unload does."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model("qwen2")
    base.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, lora_bias=True, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 2}, modules_to_save=["norm"], init_lora_weights=False)
    pm = get_peft_model(tiny_model("qwen2"), config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen) + (1.0 if "norm" in name else 0.0))
    pm.save_pretrained(tmp_path / "adapter")
    with pytest.warns(AdapterWarning, match="long_context.json"):
        quiet_apply(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    theirs = pm.merge_and_unload().state_dict()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    assert not torch.equal(ours["model.norm.weight"], base.model.norm.weight)


def test_embeddings_whole_norms_and_biases(tmp_path):
    """Qwen2 with changed biases, norms and untied embeddings saved whole: PEFT's unmerged model and our merge
    both reproduce the tuned model."""
    base_dir, tuned_dir, known = make_pair(tmp_path, "qwen2", rope=False, embed_delta=True, bias_delta=True,
                                           norm_delta=True)
    adapter = tmp_path / "adapter"
    report = quiet_extract(base_dir, tuned_dir, adapter, 4, embeddings="whole")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only"
    saved = set(config["modules_to_save"])
    assert "model.embed_tokens" in saved and "model.norm" in saved and "model.layers.0.input_layernorm" in saved
    assert set(report["saved_whole"]) == saved
    tuned = load(tuned_dir)
    ref = logits(tuned)
    assert rel_err(logits(peft_model(base_dir, adapter)), ref) <= MODEL_TOL
    quiet_apply(base_dir, adapter, tmp_path / "merged")
    assert rel_err(logits(load(tmp_path / "merged")), ref) <= MODEL_TOL


def test_energy_sets_per_module_ranks(tmp_path):
    base_dir, tuned_dir, known = make_pair(tmp_path, "llama", rope=False, rank=8, decaying=True)
    adapter = tmp_path / "adapter"
    report = quiet_extract(base_dir, tuned_dir, adapter, 6, energy=0.9)
    config = json.loads((adapter / "adapter_config.json").read_text())
    ranks = {m["module"]: m["rank"] for m in report["modules"] if m["action"] == "lora"}
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= 6
    for module, r in ranks.items():
        entry = next(m for m in report["modules"] if m["module"] == module)
        assert entry["energy"] >= 0.9 or r == 6
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    # PEFT reads the pattern: its merge equals ours.
    quiet_apply(base_dir, adapter, tmp_path / "merged")
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    theirs = peft_model(base_dir, adapter).merge_and_unload().state_dict()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6


def test_include_exclude_and_bf16(tmp_path):
    base_dir, tuned_dir, known = make_pair(tmp_path, "llama", rope=False)
    report = quiet_extract(base_dir, tuned_dir, tmp_path / "a", 4, include=[r"self_attn"], exclude=[r"\.v_proj$"],
                           dtype="bfloat16")
    lora = {m["module"] for m in report["modules"] if m["action"] == "lora"}
    assert lora == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "o_proj")}
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert rel_err(factors(tmp_path / "a", "model.layers.0.self_attn.q_proj"),
                   known["model.layers.0.self_attn.q_proj"]) < 1e-2
    peft_model(base_dir, tmp_path / "a")  # loads


def test_sharded_bfloat16_checkpoints(tmp_path):
    """Sharded bf16 checkpoints (an index file and several shards) in, the same shard layout and dtype out."""
    base_dir, tuned_dir, known = make_pair(tmp_path / "fp32", "llama")
    for name in ("base", "tuned"):
        model = load(base_dir if name == "base" else tuned_dir).to(torch.bfloat16)
        model.save_pretrained(tmp_path / name, max_shard_size="40KB")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 2
    adapter = tmp_path / "adapter"
    quiet_extract(tmp_path / "base", tmp_path / "tuned", adapter, 4)
    for module in ("model.layers.0.self_attn.q_proj", "lm_head"):
        # bf16 rounding of both weights is the only error left.
        assert rel_err(factors(adapter, module), known[module]) <= BF16_TOL
    quiet_apply(tmp_path / "base", adapter, tmp_path / "merged")
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())[
        "weight_map"]
    merged, tuned = load(tmp_path / "merged"), load(tmp_path / "tuned")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")  # the dtype in the files
    assert next(saved.parameters()).dtype == torch.bfloat16
    assert get_rope_theta(merged.config) == TUNED_THETA
    assert rel_err(logits(merged), logits(tuned)) <= BF16_TOL


# ---------------------------------------------------------------------------------------------------- RoPE config


def test_merge_into_another_finetune_warns_and_writes_tuned_rope(tmp_path):
    base_dir, tuned_dir, _ = make_pair(tmp_path, "llama")
    adapter = tmp_path / "adapter"
    quiet_extract(base_dir, tuned_dir, adapter, 4)
    # "Another fine-tune of the base": other weights in one layer and its own RoPE base / length.
    other = load(base_dir)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    set_rope_theta(other.config, 50_000.0)
    other.config.max_position_embeddings = 128
    other.save_pretrained(tmp_path / "other")
    with pytest.warns(AdapterWarning) as record:
        quiet_apply(tmp_path / "other", adapter, tmp_path / "merged")
    msg = str(record[0].message)
    assert "rope_theta: 50000" in msg and "max_position_embeddings: 128" in msg and "rope_theta=1e+06" in msg
    merged = load(tmp_path / "merged")
    assert get_rope_theta(merged.config) == TUNED_THETA and merged.config.max_position_embeddings == TUNED_MAX_POS
    (tmp_path / "merged" / "notes.txt").write_text("kept")
    with pytest.warns(AdapterWarning):
        quiet_apply(tmp_path / "other", adapter, tmp_path / "merged", overwrite=True)
    assert (tmp_path / "merged" / "notes.txt").read_text() == "kept"
    assert rel_err(logits(load(tmp_path / "merged")), logits(merged)) == 0

    proc = cli("apply", "--model", tmp_path / "other", "--adapter", adapter, "--out", tmp_path / "m2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning:") == 1 and "rope_theta" in proc.stderr


def test_legacy_config_spelling(tmp_path):
    """A target whose config.json spells the base transformers-4 style (top-level rope_theta, rope_scaling)."""
    base_dir, tuned_dir, _ = make_pair(tmp_path, "llama")
    adapter = tmp_path / "adapter"
    quiet_extract(base_dir, tuned_dir, adapter, 4)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in base_dir.iterdir():
        (legacy / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((legacy / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=BASE_THETA, rope_scaling=None)
    (legacy / "config.json").write_text(json.dumps(cfg))
    quiet_apply(legacy, adapter, tmp_path / "merged")
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written["rope_theta"] == TUNED_THETA and written["max_position_embeddings"] == TUNED_MAX_POS
    if int(transformers.__version__.split(".")[0]) >= 5:  # 4.x configs have no rope_parameters
        assert written["rope_parameters"]["rope_theta"] == TUNED_THETA
    assert get_rope_theta(load(tmp_path / "merged").config) == TUNED_THETA


def test_write_long_context_spellings():
    new = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                               "original_max_position_embeddings": 8192}, "max_position_embeddings": 32768}
    old_target = {"rope_theta": 1e4, "rope_scaling": None, "max_position_embeddings": 8192}
    lc.write_long_context(old_target, new)
    assert old_target["rope_theta"] == 5e5 and old_target["max_position_embeddings"] == 32768
    assert old_target["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    assert old_target["rope_parameters"] == new["rope_parameters"]
    legacy = {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}, "max_position_embeddings": 16384}
    new_target = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "max_position_embeddings": 8192}
    lc.write_long_context(new_target, legacy)
    assert new_target["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    assert new_target["rope_theta"] == 5e5 and new_target["max_position_embeddings"] == 16384


# ---------------------------------------------------------------------------------------------------- bad inputs


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base_dir, tuned_dir, _ = make_pair(root, "llama")
    quiet_extract(base_dir, tuned_dir, root / "adapter", 4)
    return root


def test_help(capsys):
    proc = cli("--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout and "extract" in proc.stdout
    for command in ("extract", "apply"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([command, "--help"])
        assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_bad_inputs(tmp_path, llama_adapter, capsys):
    root = llama_adapter
    adapter = root / "adapter"
    tiny_model("qwen2", max_position_embeddings=BASE_MAX_POS).save_pretrained(tmp_path / "qwen2")
    tiny_model("llama", intermediate_size=96, max_position_embeddings=BASE_MAX_POS).save_pretrained(tmp_path / "wide")
    tiny_model("llama", num_hidden_layers=1, max_position_embeddings=BASE_MAX_POS).save_pretrained(tmp_path / "short")
    tiny_model("llama", tie_word_embeddings=True, max_position_embeddings=BASE_MAX_POS).save_pretrained(tmp_path / "t")

    # The command line: one line naming the problem, exit code 2, no traceback (one real process, then main()).
    _one_line_error(cli("apply", "--model", tmp_path / "qwen2", "--adapter", adapter, "--out", tmp_path / "x"),
                    "architecture", "qwen2")
    _one_line_error(cli_in_process(capsys, "apply", "--model", tmp_path / "wide", "--adapter", adapter, "--out",
                                   tmp_path / "x"), "model.layers.0.mlp.down_proj.weight", "(64, 128)", "(64, 96)")
    _one_line_error(cli_in_process(capsys, "extract", "--base", root / "base", "--tuned", tmp_path / "wide", "--out",
                                   tmp_path / "y", "--rank", 4),
                    "model.layers.0.mlp.gate_proj.weight", "(96, 64)", "(128, 64)")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

    # The same errors from the library, and the others.
    def refused(fn, *args, match):
        with pytest.raises(AdapterError, match=match):
            fn(*args)

    refused(quiet_apply, tmp_path / "short", adapter, tmp_path / "x", match=r"model\.layers\.1\..*not in")
    refused(quiet_apply, tmp_path / "t", adapter, tmp_path / "x", match=r"lm_head\.weight.*tie")
    refused(quiet_extract, root / "base", tmp_path / "qwen2", tmp_path / "y", 4, match="architecture")
    refused(quiet_apply, root / "base", adapter, root / "tuned", match="--overwrite")
    refused(quiet_apply, root / "base", adapter, adapter, match="must differ")
    refused(quiet_extract, root / "base", root / "base", tmp_path / "y", 4, match="equals the base")
    refused(quiet_extract, root / "base", root / "tuned", tmp_path / "y", 0, match="--rank")
    with pytest.raises(FileNotFoundError, match="config.json"):
        quiet_extract(root / "base", adapter, tmp_path / "z", 4)


def test_tied_adapter_into_untied_model_is_refused(tmp_path, llama_adapter):
    base_dir, tuned_dir, _ = make_pair(tmp_path, "llama", tie=True, embed_delta=True)
    quiet_extract(base_dir, tuned_dir, tmp_path / "adapter", 4)
    with pytest.raises(AdapterError, match=r"lm_head\.weight.*tie"):
        quiet_apply(llama_adapter / "base", tmp_path / "adapter", tmp_path / "merged")


def test_undecomposable_modules(tmp_path, monkeypatch):
    """A changed module that is neither linear nor embedding nor small is refused, skipped or saved whole."""
    import easy_context.adapters.extract as ex

    base_dir, tuned_dir, _ = make_pair(tmp_path, "llama", rope=False)
    real = ex.module_specs

    def pretend_q_is_fused(model):
        specs = real(model)
        for s in specs:
            if s.name == "model.layers.0.self_attn.q_proj":
                s.kind, s.cls = "other", "FusedExperts"
        return specs

    monkeypatch.setattr(ex, "module_specs", pretend_q_is_fused)
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*FusedExperts.*--undecomp"):
        quiet_extract(base_dir, tuned_dir, tmp_path / "a", 4)
    report = quiet_extract(base_dir, tuned_dir, tmp_path / "b", 4, undecomposable="skip")
    assert report["skipped_undecomposable"] == ["model.layers.0.self_attn.q_proj"]
    report = quiet_extract(base_dir, tuned_dir, tmp_path / "c", 4, undecomposable="whole")
    assert report["saved_whole"] == ["model.layers.0.self_attn.q_proj"]


# ---------------------------------------------------------------------------------------------------- memory


MEMORY_PROBE = r"""
import json, sys
from easy_context.adapters import extract_lora
from easy_context.adapters.plan import meta_model
from transformers import AutoConfig
import peft, tqdm.auto  # what the extraction imports, loaded before the measurement
meta_model(AutoConfig.from_pretrained(sys.argv[2]))

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS")
extract_lora(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), progress=False, log=None)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def measure_extraction_memory(base_dir, tuned_dir, out, rank):
    """Peak RSS of an extraction above the RSS before it, in a fresh process (Linux only)."""
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(base_dir), str(tuned_dir), str(out), str(rank)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["peak"] - result["before"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_extraction_memory_stays_near_one_layer(tmp_path):
    """A model whose embedding and LM head (32 MiB each in float32) dwarf everything else: the extraction's peak
    RSS stays within twice the largest tensor plus a constant, not the 137 MiB of the two checkpoints."""
    base = tiny_model("llama", vocab_size=32768, hidden_size=256, intermediate_size=512)
    base.save_pretrained(tmp_path / "base")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.parameters():
            p += 1e-3 * torch.randn(p.shape, generator=gen)
    base.save_pretrained(tmp_path / "tuned")
    largest = 32768 * 256 * 4
    extra = measure_extraction_memory(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter", 16)
    print(f"extraction peak RSS above start: {extra / 2**20:.1f} MiB; largest tensor {largest / 2**20:.1f} MiB")
    assert extra <= 2 * largest + 32 * 2**20, f"{extra / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------- real model


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_round_trip_and_memory(tmp_path):
    """SmolLM2-135M (tied embeddings) with a known rank-8 change on every linear layer and on the embedding, and a
    raised RoPE base: extraction at rank 8 recovers it, its peak RSS stays within twice the largest tensor (the
    113 MiB embedding) plus a constant, and the merged model gives the tuned logits."""
    from easy_context.assets import have_assets, smollm2_path

    if not have_assets():
        pytest.skip("real assets missing: run bash scripts/setup.sh")
    base_dir = smollm2_path()
    tuned = load(base_dir)
    gen = torch.Generator().manual_seed(0)
    known = {}
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and name != "lm_head":
                known[name] = _known_delta(module.weight.shape, 8, gen, scale=0.03)
                module.weight += known[name]
    set_rope_theta(tuned.config, 925_387.0)
    tuned.save_pretrained(tmp_path / "tuned")
    largest = 49152 * 576 * 4
    extra = measure_extraction_memory(base_dir, tmp_path / "tuned", tmp_path / "adapter", 8)
    print(f"SmolLM2 extraction peak RSS above start: {extra / 2**20:.1f} MiB; largest tensor {largest / 2**20:.1f} MiB")
    assert extra <= 2 * largest + 32 * 2**20
    report = json.loads((tmp_path / "adapter" / "extraction_report.json").read_text())
    assert report["largest_residual"]["rel_residual"] <= MODEL_TOL
    for name in ("model.embed_tokens", "model.layers.29.mlp.down_proj"):
        assert rel_err(factors(tmp_path / "adapter", name), known[name]) <= MODEL_TOL
    quiet_apply(base_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = load(tmp_path / "merged")
    assert get_rope_theta(merged.config) == 925_387.0
    del tuned
    ref = logits(load(tmp_path / "tuned"), length=256)
    assert rel_err(logits(merged, length=256), ref) <= MODEL_TOL

"""LoRA: the adapter's math and bookkeeping on the trainer side (quick), and on the real engine:
adapter-only pushes with digests of the engine's adapter slots, versions, the prefix cache, the
doctor with an adapter, and a training run that trains and pushes the adapter only.

Every engine here is one shared kind (a LoRA engine with the parity settings) but for the
prefix-cache test's, which needs prefix caching on."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import cli_in_process, digit_share_config, write_addition_rows
from parityrl.config import build_config, dump_config
from parityrl.core.errors import UserError
from parityrl.models.load import load_policy
from parityrl.trainer.lora import adapter_state_dict, attach_lora, lora_settings
from parityrl.weights.lora_folder import engine_max_rank, write_peft_folder


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[3, 17, 5, 9, 30, 2, 11]])


# -- the trainer side, no engine ----------------------------------------------------------------

def test_a_run_with_lora_sizes_the_engine_and_refuses_a_rank_it_cannot_hold(tmp_path):
    base = {"trainer": {"lora": {"rank": 4}}}
    assert build_config(base).engine.max_lora_rank == 8  # vLLM's next allowed rank
    assert build_config({"trainer": {"lora": {"rank": 9}}}).engine.max_lora_rank == 16
    assert build_config({}).engine.max_lora_rank is None  # full fine-tuning: no LoRA engine
    # Several engines take adapters as folders: no gloo transfer group is asked for.
    assert build_config(base | {"cluster": {"engines": 2}}).engine.weight_transport == "shm_file"
    with pytest.raises((UserError, ValueError), match="cannot hold"):
        build_config({"engine": {"max_lora_rank": 8}, "trainer": {"lora": {"rank": 16}}})
    assert engine_max_rank(1) == 1 and engine_max_rank(32) == 32


def test_a_zero_adapter_changes_nothing_and_only_the_adapter_trains(tiny_model):
    model = load_policy(tiny_model)
    before = logits_of(model, IDS)
    names = attach_lora(model, rank=4, alpha=8, seed=0)
    assert torch.equal(logits_of(model, IDS), before)  # B = 0: the base model exactly
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model)) and len(trainable) == 2 * len(names)
    assert all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trainable)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in trainable  # PEFT's names
    assert not any("lm_head" in n for n in trainable)
    only_qv = load_policy(tiny_model)
    assert len(attach_lora(only_qv, 4, 8, targets=["q_proj", "v_proj"])) == 2 * 2  # 2 layers
    with pytest.raises(UserError, match="no linear named nope"):
        attach_lora(load_policy(tiny_model), 4, 8, targets=["nope"])


@pytest.mark.parametrize("rslora", [False, True])
def test_the_adapter_adds_its_scaled_low_rank_update_to_the_weight(tiny_model, rslora):
    """With random A and B the adapted model equals the base model with W + s·B·A merged into
    every target weight (float64, to rounding), s = alpha/r or alpha/√r."""
    model = load_policy(tiny_model).double()
    rank, alpha = 4, 16.0
    attach_lora(model, rank, alpha, rslora=rslora, seed=1, init_b_std=0.1)
    merged = load_policy(tiny_model).double()
    scale = alpha / (rank ** 0.5 if rslora else rank)
    with torch.no_grad():
        for name, module in merged.named_modules():
            adapted = model.get_submodule(name) if name else None
            if adapted is not None and hasattr(adapted, "lora_A"):
                module.weight += scale * adapted.lora_B.weight @ adapted.lora_A.weight
    assert not torch.allclose(logits_of(model, IDS), logits_of(load_policy(tiny_model).double(),
                                                               IDS), atol=1e-3)
    torch.testing.assert_close(logits_of(model, IDS), logits_of(merged, IDS), rtol=0, atol=1e-9)


def test_an_adapter_checkpoint_holds_the_adapter_only_and_resumes_exactly(tiny_model, tmp_path):
    from parityrl.trainer.trainer import Trainer

    cfg = build_config({"model": tiny_model, "trainer": {"lora": {"rank": 4, "alpha": 8}}})

    def trainer() -> Trainer:
        model = load_policy(tiny_model)
        attach_lora(model, 4, 8, seed=0, init_b_std=0.1)
        return Trainer(cfg, model, pad_id=0)

    first = trainer()
    with torch.no_grad():
        for p in first.params:
            p.add_(0.01)
    first.version = 3
    first.save_checkpoint(tmp_path, step=3, data_position=12, keep=2)
    folder = tmp_path / "checkpoints" / "step-000003"
    assert set(load_file(str(folder / "model.safetensors"))) == set(adapter_state_dict(first.model))
    assert json.loads((folder / "state.json").read_text())["extra"]["lora"]["rank"] == 4
    second = trainer()
    state = second.restore(folder)
    assert (state.step, state.data_position, second.version) == (3, 12, 3)
    for name, tensor in adapter_state_dict(first.model).items():
        assert torch.equal(adapter_state_dict(second.model)[name], tensor), name
    other = load_policy(tiny_model)
    attach_lora(other, 8, 8)  # another rank: refused in one line, nothing loaded
    with pytest.raises(UserError, match="LoRA adapter"):
        Trainer(cfg, other, pad_id=0).restore(folder)
    (tmp_path / "config.yaml").write_text(dump_config(cfg))  # tmp_path is now a run directory
    check_exports(tiny_model, tmp_path, first.model)


def check_exports(base: str, run_dir, trained) -> None:
    """A LoRA run exported as a PEFT folder gives the trainer's logprobs when peft loads it on
    the base model; merged into the base (--merge), the same to float32 rounding."""
    from peft import PeftModel

    from parityrl.export import export_checkpoint

    adapter = export_checkpoint(run_dir, run_dir / "export" / "adapter")
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "parityrl_export.json"]
    by_peft = PeftModel.from_pretrained(load_policy(base), str(adapter)).eval()
    merged = load_policy(str(export_checkpoint(run_dir, run_dir / "export" / "merged",
                                               merge=True)))
    ids = torch.tensor([[3, 17, 5, 9, 30, 2, 11, 40, 41, 42]])
    ours = logits_of(trained, ids).log_softmax(-1)
    assert (logits_of(by_peft, ids).log_softmax(-1) - ours).abs().max() <= 1e-5
    assert (logits_of(merged, ids).log_softmax(-1) - ours).abs().max() <= 1e-5
    assert (logits_of(load_policy(base), ids).log_softmax(-1) - ours).abs().max() > 1e-3


# -- on the real engine -------------------------------------------------------------------------

def lora_engine_settings(model: str, **knobs):
    from parityrl.engine.settings import EngineSettings

    return EngineSettings(model=model, max_lora_rank=8, **knobs)


async def _push_and_sample(engine, model, version: int, prompts, sampling, **push):
    report = await engine.update_adapter(adapter_state_dict(model), lora_settings(model),
                                         version=version, **push)
    return report, await engine.generate_many(prompts, sampling, n=2, seed=version)


def _max_abs_diff(model, rollouts, sampling) -> float:
    from parityrl.trainer.batch import rollout_logprobs

    scored = rollout_logprobs(model, rollouts, sampling, pad_id=0, fp32_lm_head=True)
    trainer = torch.cat([r.logprobs for r in scored]).double()
    engine = torch.tensor([lp for r in rollouts for lp in r.sampled_logprobs], dtype=torch.float64)
    return float((trainer - engine).abs().max())


def _move(model, seed: int) -> None:
    from parityrl.doctor.session import perturb_in_place

    perturb_in_place(model, 0.5, seed)


@pytest.mark.slow
def test_adapter_pushes_reach_the_engine_verified_versioned_and_in_parity(tiny_model):
    """Each push: the engine's adapter slot digests equal the trainer's prediction, the version
    is the trainer's, new rollouts carry it and match the trainer's logprobs with the adapter;
    an adapter left out in part is caught by the digests."""
    from parityrl.engine.source import start_engine
    from parityrl.core.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=0.7, max_tokens=12)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    model = load_policy(tiny_model)
    attach_lora(model, 8, 16, seed=0, init_b_std=0.05)

    async def scenario():
        engine = await start_engine(lora_engine_settings(tiny_model))
        try:
            with pytest.raises(RuntimeError, match="adapter"):  # never a base-model request
                await engine.generate(prompts[0], sampling)
            seen = []
            for version in (1, 2):
                if version == 2:
                    _move(model, seed=version)
                report, rollouts = await _push_and_sample(engine, model, version, prompts,
                                                          sampling)
                seen.append((report, engine.version, rollouts, _max_abs_diff(model, rollouts,
                                                                              sampling)))
            skipped = sorted(adapter_state_dict(model))[:2]
            _move(model, seed=3)
            partial = await engine.update_adapter(adapter_state_dict(model),
                                                  lora_settings(model), version=3, verify=False,
                                                  skip=set(skipped))
            return seen, partial, skipped
        finally:
            await engine.close()

    seen, partial, skipped = asyncio.run(scenario())
    for version, (report, engine_version, rollouts, diff) in enumerate(seen, start=1):
        assert report.check.ok and report.check.checked > 0, report.check.summary()
        assert report.version == engine_version == version
        assert all(set(r.versions) == {version} for r in rollouts)
        assert diff <= 1e-5, (version, diff)
    assert not partial.check.ok and partial.check.different == skipped, partial.check.summary()


@pytest.mark.slow
def test_an_adapter_update_resets_the_prefix_cache(tiny_model):
    """With prefix caching on and the adapter replaced in place under its old name (vLLM keys
    cached prefixes by adapter name and path): after the update with a reset, a long prompt's
    logprobs are the new adapter's; without one, its cached KV of the old adapter is reused and
    it shows. Private engine kind: the parity settings have prefix caching off."""
    from parityrl.engine.source import start_engine
    from parityrl.core.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=0.7, max_tokens=6)
    long_prompt = [[(7 * i) % 60 + 3 for i in range(300)]]  # > 2 blocks of 128 tokens
    model = load_policy(tiny_model)
    attach_lora(model, 8, 16, seed=0, init_b_std=0.05)

    async def scenario():
        engine = await start_engine(lora_engine_settings(tiny_model, enable_prefix_caching=True,
                                                         max_model_len=512))
        try:
            diffs = {}
            await _push_and_sample(engine, model, 1, long_prompt, sampling)  # cached under v1
            for version, reset in ((2, True), (3, False)):
                _move(model, seed=version)
                _, rollouts = await _push_and_sample(engine, model, version, long_prompt,
                                                     sampling, keep_name=True,
                                                     reset_prefix_cache=reset)
                diffs[reset] = _max_abs_diff(model, rollouts, sampling)
            return diffs
        finally:
            await engine.close()

    diffs = asyncio.run(scenario())
    assert diffs[True] <= 1e-5, diffs
    assert diffs[False] > 1e-3, diffs  # the stale cache is visible: the test can see it


@pytest.mark.slow
def test_doctor_with_an_adapter_passes_and_a_withheld_adapter_push_fails_by_name(tiny_model,
                                                                                 tmp_path):
    ok = cli_in_process("doctor", "--model", tiny_model, "--quick", "--lora", "8", "--bitwise",
                        "--json", str(tmp_path / "d.json"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    result = json.loads((tmp_path / "d.json").read_text())
    rung, bitwise = result["rungs"]
    # The trainer running the engine's kernels, its LoRA path included: every token equal.
    assert bitwise["name"] == "bitwise" and bitwise["metrics"]["mismatch/max_abs_diff"] == 0.0
    assert rung["settings"]["trainer_lora"]["rank"] == 8
    assert rung["settings"]["lora"]["max_lora_rank"] == 8
    assert rung["weight_sync_ok"] is True and result["passed"] is True
    # The adapter is not a zero one: it moves the logprobs far beyond the parity bound.
    assert rung["metrics"]["lora/adapter_effect_mean_abs"] > 1e-3
    assert "LoRA: a random rank-8 adapter" in ok.stdout
    withheld = cli_in_process("doctor", "--model", tiny_model, "--quick", "--lora", "8",
                              "--withhold", "weight-sync")
    assert withheld.returncode == 1, withheld.stdout + withheld.stderr
    assert "FAIL at the weight synchronisation layer" in withheld.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("plugins_importable")
def test_a_lora_run_on_two_engines_trains_and_pushes_the_adapter_only_in_parity(tiny_model,
                                                                                 tmp_path):
    """Async, in-flight updates, two engines: both verified holding the trainer's adapter (the
    same slot digests) after every step, both served rollouts."""
    from parityrl.pipeline import run_training
    from parityrl.runlog import read_metrics

    prompts = write_addition_rows(tmp_path / "prompts.jsonl")
    cfg = build_config(digit_share_config(tiny_model, prompts, **{
        "max_steps": 4, "trainer.lora": {"rank": 8, "alpha": 16}, "trainer.optim.lr": 1e-2,
        "sampling.max_tokens": 48, "actor.max_lag": 1, "parity.probe_wait_s": 5.0,
        "checkpoint.every": 2, "cluster.engines": 2}))
    run_dir = tmp_path / "run"
    result = run_training(cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert result.steps == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["sync/engines_verified"] == 2.0 for r in rows)
    assert rows[-1]["engine/groups_served_0"] > 0 and rows[-1]["engine/groups_served_1"] > 0
    mismatch = [r["mismatch/max_abs_diff"] for r in rows if "mismatch/max_abs_diff" in r]
    assert len(mismatch) >= 3 and max(mismatch) <= 1e-5, mismatch
    assert any(r["rl/grad_norm"] > 0 for r in rows)
    settings = json.loads((run_dir / "engine_settings.json").read_text())
    assert settings["lora"]["max_lora_rank"] == 8 and settings["engines"] == 2
    saved = load_file(str(run_dir / "checkpoints" / "step-000004" / "model.safetensors"))
    assert saved and all(".lora_" in n for n in saved)
    assert any(bool(t.any()) for n, t in saved.items() if ".lora_B." in n)  # B trained off zero
    check_exported_adapter_on_the_engine(tiny_model, run_dir, saved)


def check_exported_adapter_on_the_engine(base: str, run_dir, saved: dict) -> None:
    """`parityrl export` of the run's last checkpoint, loaded by vLLM's own request path from
    disk (as `vllm serve --lora-modules` would), samples what the run's push of the same adapter
    sampled: the same tokens and logprobs for the same seeds."""
    from parityrl.engine.source import start_engine
    from parityrl.export import export_checkpoint
    from parityrl.core.sampling import SamplingConfig

    folder = export_checkpoint(run_dir, run_dir.parent / "exported")
    lora = json.loads((run_dir / "checkpoints" / "step-000004" / "state.json").read_text())[
        "extra"]["lora"]
    sampling = SamplingConfig(temperature=1.0, max_tokens=12)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]

    async def pushed_then_served():
        engine = await start_engine(lora_engine_settings(base))
        try:
            await engine.update_adapter(saved, lora, version=4)
            pushed = await engine.generate_many(prompts, sampling, n=2, seed=4)
            engine.serve_adapter_folder(folder)
            served = await engine.generate_many(prompts, sampling, n=2, seed=4)
            return pushed, served, engine.adapter.lora_path
        finally:
            await engine.close()

    pushed, served, path = asyncio.run(pushed_then_served())
    assert path == str(folder.resolve())
    assert [r.completion_ids for r in pushed] == [r.completion_ids for r in served]
    diff = max(abs(a - b) for p, s in zip(pushed, served)
               for a, b in zip(p.sampled_logprobs, s.sampled_logprobs))
    assert diff <= 1e-6, diff
    assert (folder / "adapter_config.json").exists()  # a served folder is never removed


def test_a_peft_folder_is_what_peft_and_vllm_read(tiny_model, tmp_path):
    model = load_policy(tiny_model)
    attach_lora(model, 4, 8, seed=0, init_b_std=0.1)
    folder = write_peft_folder(tmp_path / "adapter", adapter_state_dict(model),
                               lora_settings(model), base_model=tiny_model)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert all(n.startswith("base_model.model.model.layers.") for n in tensors)
    assert len(tensors) == len(adapter_state_dict(model))

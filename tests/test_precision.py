"""precision: auto (clipline.precision): bf16 on CUDA devices with bf16 and on CPUs with native bf16, fp32
otherwise; each branch forced by patching the capability check, through the function, the trainer (printed line,
saved configs, autocast really used) and the prep CLIP scorer. Eval's branches are in test_eval_suite.py."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
import yaml

from clipline import precision
from clipline.config import load_config
from clipline.dist import DistEnv
from clipline.precision import cpu_native_bf16, resolve_precision
from conftest import REPO, TEST_CONFIG, TINY_MODEL
from training.trainer import TRAIN_STATE, Trainer

DEMO = str(REPO / "configs" / "demo.yaml")


@contextlib.contextmanager
def observed_dtypes():
    """The (module type, output dtype) pairs of every module forward while inside: bf16 outputs of Linear/Conv2d
    mean autocast was on."""
    seen: set[tuple[str, torch.dtype]] = set()

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            seen.add((type(module).__name__, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def force_cpu(monkeypatch, native: bool) -> None:
    why = "CPU with native bf16: avx512_bf16" if native else "CPU without native bf16 (no avx512_bf16/amx_bf16)"
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: (native, why))


# -- the rule ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device, native, expected", [("cuda", True, "bf16"), ("cuda", False, "fp32"),
                                                      ("cpu", True, "bf16"), ("cpu", False, "fp32")])
def test_auto_picks_bf16_only_where_the_hardware_has_it(monkeypatch, device, native, expected):
    monkeypatch.setattr(precision, "cuda_bf16_supported", lambda d: native)
    force_cpu(monkeypatch, native)
    choice = resolve_precision("auto", device)
    assert (choice.precision, choice.requested) == (expected, "auto")
    assert choice.line().startswith(f"precision auto -> {expected} (")
    assert ("without native bf16" in choice.line()) == (not native)
    for explicit in ("fp32", "bf16", "fp16"):  # what the config sets is what runs
        assert resolve_precision(explicit, device).precision == explicit


def test_explicit_bf16_on_a_cpu_without_it_says_it_is_slow(monkeypatch):
    force_cpu(monkeypatch, False)
    assert "several times slower than fp32" in resolve_precision("bf16", "cpu").line()
    assert resolve_precision("fp32", "cpu").line() == "precision fp32 (set in the config)"


@pytest.mark.parametrize("flags, capability, env, native", [
    ({"avx2", "avx512f"}, "AVX512", {}, False),                        # AVX-512 without bf16: emulated
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", {}, True),
    ({"avx2", "amx_bf16", "amx_tile"}, "AVX512", {}, True),
    ({"avx2", "avx512_bf16"}, "AVX2", {}, False),                       # ATEN_CPU_CAPABILITY=avx2
    ({"avx2", "avx512_bf16"}, "AVX512", {"DNNL_MAX_CPU_ISA": "AVX2"}, False),
    ({"avx2", "avx512_bf16"}, "AVX512", {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, False),
    ({"avx2", "avx512_bf16"}, "AVX512", {"DNNL_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),
    ({"avx2", "avx512_bf16"}, "AVX512", {"DNNL_MAX_CPU_ISA": "ALL"}, True),
])
def test_cpu_check_reads_the_flags_and_the_kernel_caps(monkeypatch, flags, capability, env, native):
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    for var in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert cpu_native_bf16()[0] is native


def test_the_avx2_caps_make_auto_say_fp32_on_this_machine():
    """Unpatched, in a fresh interpreter: the environment that imitates an AVX2-only CPU gives fp32 whatever
    this CPU has (on such a CPU torch emulates bf16, 7-13x slower than fp32 for the demo model)."""
    code = "from clipline.precision import resolve_precision; print(resolve_precision('auto', 'cpu').line())"
    env = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("precision auto -> fp32 ("), out.stdout


def test_a_concrete_precision_is_needed_for_autocast():
    with pytest.raises(ValueError, match="resolve 'auto'"):
        precision.autocast("cpu", "auto")


# -- the trainer ---------------------------------------------------------------------------------------------------

def _train(tmp_path, *overrides) -> Trainer:
    cfg = load_config([DEMO, str(TEST_CONFIG)], [f"run.output_dir={tmp_path}", "train.data=synthetic",
                                                  "train.steps=1", "train.save_every=1", "train.resume=never",
                                                  *overrides])
    trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    with observed_dtypes() as seen:
        assert trainer.train()
    trainer.observed = seen
    return trainer


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_trainer_auto_prints_runs_and_saves_the_concrete_choice(tmp_path, monkeypatch, capsys, native, expected):
    force_cpu(monkeypatch, native)
    trainer = _train(tmp_path)  # demo.yaml says precision: auto
    out = capsys.readouterr().out
    assert f"precision auto -> {expected} (CPU with{'' if native else 'out'} native bf16" in out
    assert (("Conv2d", torch.bfloat16) in trainer.observed) == native  # autocast ran, or did not
    assert (("Linear", torch.bfloat16) in trainer.observed) == native
    ckpt = tmp_path / "train" / "checkpoints" / "step_00000001"
    for saved in (tmp_path / "train" / "config.yaml", ckpt / "config.yaml"):
        text = saved.read_text()
        assert yaml.safe_load(text)["train"]["precision"] == expected
        assert text.startswith(f"# train.precision: auto -> {expected} (")
        assert load_config([str(saved)]).train.precision == expected  # the saved config loads as it ran
    state = torch.load(ckpt / TRAIN_STATE, map_location="cpu", weights_only=True)
    assert state["precision"]["precision"] == expected and state["precision"]["requested"] == "auto"


def test_trainer_keeps_an_explicit_precision(tmp_path, monkeypatch, capsys):
    force_cpu(monkeypatch, True)
    trainer = _train(tmp_path, "train.precision=fp32")
    assert "precision fp32 (set in the config)" in capsys.readouterr().out
    assert ("Conv2d", torch.bfloat16) not in trainer.observed
    text = (tmp_path / "train" / "config.yaml").read_text()
    assert not text.startswith("#") and yaml.safe_load(text)["train"]["precision"] == "fp32"


# -- the prep CLIP scorer ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    from clipline.models import register_architecture

    torch.manual_seed(0)
    model = open_clip.create_model(register_architecture(str(TINY_MODEL)))
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_clip_scorer_auto(monkeypatch, capsys, tiny_clip, native, expected):
    from conftest import make_samples
    from data_prep.clip_score import ClipScorer

    force_cpu(monkeypatch, native)
    scorer = ClipScorer(str(TINY_MODEL), tiny_clip)  # prep.filters.clip_precision defaults to auto
    assert f"[prep] CLIP score: precision auto -> {expected} (" in capsys.readouterr().out
    samples = make_samples(4, seed=3, image_size=64)
    with observed_dtypes() as seen:
        scores = scorer.scores([s["jpg"] for s in samples], [s["txt"] for s in samples])
    assert scores.dtype == "float32" and ((("Conv2d", torch.bfloat16) in seen) == native)
    assert (("Linear", torch.bfloat16) in seen) == native


def test_precision_keys_default_to_auto_and_check_values():
    cfg = load_config([], ["prep.filters.clip_precision=fp32"])
    assert cfg.prep.filters.clip_precision == "fp32"
    with pytest.raises(Exception, match="not one of"):
        load_config([], ["prep.filters.clip_precision=fp8"])
    demo = load_config([DEMO])
    assert (demo.train.precision, demo.eval.precision, demo.prep.filters.clip_precision) == ("auto",) * 3

"""The GPU switches (``train.gpu``) change speed, not results; the learning-rate rule and its warmup."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from gloo import join_gloo
from s3server import free_port
from test_model import V, random_captions, tiny_config

from captioning.config import GpuConfig, load_config
from captioning.data.batch import Batch
from captioning.model import build_captioner
from captioning.model.captioner import Captioner
from captioning.model.search import beam_search
from captioning.training.dist import DistInfo
from captioning.training.objective import CaptionObjective, XeForward
from captioning.training.optim import LrSchedule, build_optimizer
from captioning.training.speed import apply_speed, resolve_speed, scaled_lr, warmup_steps
from captioning.training.stage import StageSetup, build_stage_setup
from captioning.training.steps import autocast, build_step, stage_lr_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL_OFF = GpuConfig(
    channels_last="off", fused_adam="off", compile="off", cudnn_benchmark="off", ddp_bucket_view="off"
)


def test_auto_is_on_for_cuda_and_off_on_the_cpu() -> None:
    auto = GpuConfig(compile="auto")
    cuda, cpu = resolve_speed(auto, torch.device("cuda", 0)), resolve_speed(auto, torch.device("cpu"))
    assert all(vars(cuda).values()) and not any(vars(cpu).values())
    defaults = resolve_speed(GpuConfig(), torch.device("cuda", 0))
    assert not defaults.compile and defaults.channels_last and defaults.fused_adam  # compile: opt in
    assert not any(vars(resolve_speed(GpuConfig(), torch.device("cpu"))).values())  # the CPU: as before
    forced = resolve_speed(GpuConfig(channels_last="on", fused_adam="off"), torch.device("cpu"))
    assert forced.channels_last and not forced.fused_adam
    assert forced.describe().startswith("channels_last on, fused_adam off, compile off")


def test_learning_rate_rule() -> None:
    assert scaled_lr(4e-4, 640, 80, "sqrt") == pytest.approx((4e-4 * math.sqrt(8), math.sqrt(8)))
    assert scaled_lr(4e-4, 640, 80, "linear") == pytest.approx((3.2e-3, 8.0))
    assert scaled_lr(4e-4, 640, 80, "none") == (4e-4, 1.0)
    assert scaled_lr(1e-3, 80, 160, "sqrt")[1] == pytest.approx(math.sqrt(0.5))  # smaller steps: lower
    assert warmup_steps(2.0, 1.0, 886) == 886 and warmup_steps(0.7, 1.0, 886) == 0  # only when raised
    assert warmup_steps(2.0, 0.25, 10) == 3
    with pytest.raises(ValueError, match="unknown lr_scaling"):
        scaled_lr(1e-3, 80, 80, "cubic")  # type: ignore[arg-type]


def test_the_coco_recipe_steps_like_its_anchors_and_scales_for_eight_gpus() -> None:
    cfg = load_config("coco")
    rows = {}
    for stage in ("xe", "finetune", "scst"):
        setup = build_stage_setup(cfg, stage, "unused")
        steps = math.ceil(113_287 / (setup.batch_size * 8))
        rows[stage] = (setup.batch_size * setup.captions_per_image, steps, stage_lr_plan(setup, 8, steps))
    assert [r[0] for r in rows.values()] == [80, 40, 50]  # per rank: seed 004's 80 and ~32, ruotianluo's 50
    assert [r[1] for r in rows.values()] == [886, 1771, 1417]
    xe, finetune, scst = (r[2] for r in rows.values())
    assert xe.captions_per_step == 640 and xe.lr_decoder == pytest.approx(4e-4 * 8)  # the linear rule
    assert finetune.lr_encoder == pytest.approx(1e-4 * 10) and finetune.warmup_steps == 1771
    assert scst.lr_decoder == pytest.approx(2e-5 * 8)
    assert (
        "640 captions per step; lr decoder 3.20e-03 = set x (640/80) = x8, warmup over 886 steps"
        in xe.describe()
    )
    demo = build_stage_setup(load_config("demo"), "xe", "unused")  # tuned at 2 x 16 x 5 = 160
    assert stage_lr_plan(demo, 2, 38).factor == 1.0 and stage_lr_plan(demo, 2, 38).warmup_steps == 0


def test_warmup_climbs_from_the_configured_rate_then_the_schedule_takes_over() -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=2.0)  # the scaled rate
    schedule = LrSchedule(
        opt,
        kind="plateau",
        total_steps=100,
        decay_factor=0.5,
        decay_patience=1,
        warmup_steps=4,
        warmup_start=0.5,
    )
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(6):
        schedule.step_batch()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1.0, 1.25, 1.5, 1.75, 2.0, 2.0, 2.0])
    assert schedule.step_epoch(1) and opt.param_groups[0]["lr"] == pytest.approx(1.0)
    state = schedule.state_dict()
    again = LrSchedule(opt, kind="plateau", total_steps=100, decay_factor=0.5, decay_patience=1)
    again.load_state_dict(state)
    assert again.warmup_steps == 4 and opt.param_groups[0]["lr"] == pytest.approx(1.0)
    old = {k: v for k, v in state.items() if not k.startswith("warmup")}  # a checkpoint from before
    again.load_state_dict(old)
    assert again.warmup_steps == 0


def _setup(gpu: GpuConfig, **changes: Any) -> StageSetup:
    # No recipe file: a spawned rank may import the package from elsewhere (an MLflow model's code).
    cfg = load_config(None, ["--train.finetune.lr_reference_captions=6", "--data.loader.seq_per_img=2"])
    setup = build_stage_setup(cfg, "finetune", "unused")
    # Adam's first steps move every weight by about its rate whatever the gradient's size, so a
    # float-level difference in a near-zero gradient can flip a step: small rates keep that small.
    return dataclasses.replace(setup, gpu=gpu, batch_size=3, lr_decoder=1e-5, lr_encoder=1e-5, **changes)


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    captions, lengths = random_captions(3, 2, 7, seed=seed)
    return Batch(
        images=torch.randn(3, 3, 64, 64, generator=g),
        captions=captions,
        lengths=lengths,
        image_ids=torch.arange(3),
        is_pad=torch.zeros(3, dtype=torch.bool),
    )


def _train(gpu: GpuConfig, dist: DistInfo | None = None, steps: int = 3) -> tuple[list[float], Captioner]:
    dist = dist or DistInfo()
    torch.manual_seed(0)
    model = build_captioner(tiny_config(), V)
    model.encoder.set_fine_tuning(True, 1)
    model.train()
    setup = _setup(gpu)
    generator = torch.Generator().manual_seed(1)
    _, step = build_step(setup, model, dist, generator, None, steps_per_epoch=steps)
    losses = []
    for i in range(steps):
        torch.manual_seed(100 + i)  # the same dropout masks in every run
        losses.append(float(step(_batch(dist.rank * 10 + i))["loss"]))
    return losses, model


def _same(a: Captioner, b: Captioner, atol: float) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x.contiguous(), y.contiguous(), atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("switch", ["channels_last", "fused_adam", "cudnn_benchmark"])
def test_a_switch_changes_no_result_on_the_cpu(switch: str) -> None:
    base_losses, base = _train(ALL_OFF)
    losses, model = _train(dataclasses.replace(ALL_OFF, **{switch: "on"}))  # type: ignore[arg-type]
    assert losses == pytest.approx(base_losses, rel=1e-5)
    _same(model, base, atol=2 * 1e-5 * len(losses))  # a flipped Adam step moves a weight by 2 lr
    if switch == "channels_last":
        conv1: Any = model.encoder.backbone.conv1
        assert conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_encodes_the_same_features_and_captions() -> None:
    torch.manual_seed(0)
    model = build_captioner(tiny_config(), V).eval()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        before = model.encode(images)
        expected = beam_search(model, before, beam_size=3, max_len=6)
        apply_speed(model, resolve_speed(GpuConfig(channels_last="on"), torch.device("cpu")))
        after = model.encode(images)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert torch.equal(beam_search(model, after, beam_size=3, max_len=6).tokens, expected.tokens)


def test_bf16_autocast_keeps_the_loss_in_fp32() -> None:
    """The whole cross-entropy path under bf16 autocast (CPU's, standing in for CUDA's): the loss is
    fp32 and close to the fp32 one."""
    torch.manual_seed(0)
    model = build_captioner(tiny_config(), V).eval()
    batch = _batch(0)
    forward, objective = XeForward(model, train_encoder=True), CaptionObjective(1.0)
    reference = objective(
        forward(batch.images, batch.captions, batch.lengths), batch.captions, batch.lengths, batch.is_pad
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward(batch.images, batch.captions, batch.lengths)
        parts = objective(out, batch.captions, batch.lengths, batch.is_pad)
    assert out.logits.dtype == torch.bfloat16  # the matmuls did run in bf16
    assert parts.loss.dtype == torch.float32
    assert float(parts.loss.detach()) == pytest.approx(float(reference.loss.detach()), rel=2e-2)
    parts.loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert isinstance(autocast(torch.device("cpu"), "bf16"), contextlib.nullcontext)  # the CPU runs fp32


def _ddp_rank(rank: int, world: int, port: int, bucket_view: Any, out: str) -> None:
    torch.set_num_threads(1)
    dist = join_gloo(rank, world, port)
    losses, model = _train(dataclasses.replace(ALL_OFF, ddp_bucket_view=bucket_view), dist, steps=2)
    if rank == 0:
        torch.save({"losses": losses, "model": model.state_dict()}, out)


@pytest.mark.integration
def test_ddp_bucket_views_change_no_result(tmp_path: Path) -> None:
    results = []
    for view in ("off", "on"):
        out = str(tmp_path / f"{view}.pt")
        mp.spawn(_ddp_rank, args=(2, free_port(), view, out), nprocs=2, join=True)
        results.append(torch.load(out))
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], rel=1e-6)
    for name, value in results[0]["model"].items():
        torch.testing.assert_close(results[1]["model"][name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.integration
def test_compiled_encoder_and_step_give_the_same_captions_and_training() -> None:
    """torch.compile (inductor, a C++ compiler on the CPU): off by default, so checked here."""
    torch.manual_seed(0)
    model = build_captioner(tiny_config(), V).eval()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = beam_search(model, model.encode(images), beam_size=3, max_len=6)
        keys = set(model.state_dict())
        apply_speed(model, resolve_speed(GpuConfig(compile="on"), torch.device("cpu")))
        got = beam_search(model, model.encode(images), beam_size=3, max_len=6)
    assert set(model.state_dict()) == keys  # compiled in place: checkpoints keep their keys
    assert torch.equal(got.tokens, expected.tokens)
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-4, rtol=1e-4)
    base_losses, base = _train(ALL_OFF, steps=2)
    losses, compiled = _train(dataclasses.replace(ALL_OFF, compile="on"), steps=2)
    assert losses == pytest.approx(base_losses, rel=1e-4)
    _same(compiled, base, atol=1e-4)


def test_fused_adam_is_used_when_asked() -> None:
    model = build_captioner(tiny_config(), V)
    fused = build_optimizer(model, lr_decoder=1e-3, lr_encoder=0.0, train_encoder=False, fused=True)
    plain = build_optimizer(model, lr_decoder=1e-3, lr_encoder=0.0, train_encoder=False)
    assert fused.defaults["fused"] and not plain.defaults.get("fused")


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu", "numpy")


def test_a_cross_entropy_step_waits_for_the_device_nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way our code could read a tensor on the host (wait for a GPU) is counted during training
    steps. One read per step remains: the teacher-forced forward's rows per step (seed 004's sort by
    length, ``decoders._ActiveRows``), a few integers at the step's start. Otherwise only the
    logger's window reads, once per logging step."""
    import sys

    from captioning.training.windows import MetricWindow

    calls: list[str] = []
    ours = str(Path(__file__).resolve().parents[1] / "captioning")
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _name: str = name, _original: Any = original) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours):
                calls.append(f"{_name} in {Path(caller).name}")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    torch.manual_seed(0)
    model = build_captioner(tiny_config(), V)
    model.encoder.set_fine_tuning(True, 1)
    model.train()
    _, step = build_step(_setup(ALL_OFF), model, DistInfo(), torch.Generator(), None, steps_per_epoch=3)
    window = MetricWindow()
    for i in range(3):
        window.add(step(_batch(i)))
    assert calls == ["tolist in decoders.py"] * 3
    calls.clear()
    pooled = window.pooled(DistInfo())
    assert calls == ["tolist in windows.py"] and pooled["loss"] > 0 and pooled["ce"] > 0

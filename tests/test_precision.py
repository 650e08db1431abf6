"""Every precision branch, with the device's answers faked where the code asks them (CUDA's compute
capability, torch's bf16 claim, the CPU's flags in /proc/cpuinfo), and a real fp16 + GradScaler step."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import common.lifecycle as lifecycle
from common import Config, UserError
from common.models import StridedPointwise, build_model, resnet18
from common.lifecycle import configure_backends, pick_precision
from common.training import autocast, grad_scaler

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.fixture
def gpu(monkeypatch):
    """A fake CUDA card: set its compute capability; torch.cuda.is_bf16_supported() says True on every card,
    as it does on pre-Ampere ones (it counts emulation), so the code must not ask it."""
    def card(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return card


@pytest.fixture
def cpu_flags(monkeypatch, tmp_path):
    def cpu(*flags):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 {' '.join(flags)}\n\n")
        monkeypatch.setattr(lifecycle, "CPUINFO", str(path))
    return cpu


def test_ampere_and_newer_get_bf16(gpu):
    gpu((8, 0))
    assert pick_precision("auto", CUDA) == "bf16" and pick_precision("bf16", CUDA) == "bf16"
    gpu((9, 0))
    assert pick_precision("auto", CUDA) == "bf16"


@pytest.mark.parametrize("capability", [(7, 5), (7, 0), (6, 1)])  # T4 / RTX 20xx, V100, GTX 10xx
def test_pre_ampere_gets_fp16_with_a_scaler_and_refuses_bf16(gpu, capability):
    gpu(capability)
    assert pick_precision("auto", CUDA) == "fp16"
    with pytest.raises(UserError, match="--amp fp16"):
        pick_precision("bf16", CUDA)
    assert pick_precision("off", CUDA) == "fp32" and pick_precision("fp16", CUDA) == "fp16"


def test_cpu_bf16_only_with_native_bf16_flags(cpu_flags):
    cpu_flags("avx512f", "avx512bw")  # AVX-512 without BF16: emulated, slower than fp32
    assert pick_precision("auto", CPU) == "fp32"
    with pytest.raises(UserError, match="--amp off"):
        pick_precision("bf16", CPU)
    cpu_flags("avx512f", "avx512_bf16")
    assert pick_precision("auto", CPU) == "bf16"
    cpu_flags("amx_tile", "amx_bf16")
    assert pick_precision("auto", CPU) == "bf16"
    assert pick_precision("off", CPU) == "fp32"


def test_scaler_only_for_fp16():
    assert grad_scaler(CPU, "fp16").is_enabled()
    assert not grad_scaler(CPU, "bf16").is_enabled() and not grad_scaler(CPU, "fp32").is_enabled()


def test_fp16_and_grad_scaler_train_for_real_on_cpu():
    torch.manual_seed(0)
    model = resnet18(width=8).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = grad_scaler(CPU, "fp16")
    x = torch.rand(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    losses = []
    for _ in range(8):
        with autocast(CPU, "fp16"):
            logits = model(x)
        assert logits.dtype == torch.float16  # autocast really ran in fp16
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert scaler.get_scale() > 0 and losses[-1] < losses[0]


def test_backends_autotune_by_default_and_deterministic_on_request(gpu):
    try:
        assert configure_backends(CPU, False) == dict(deterministic=False, cudnn_benchmark=True, tf32=None)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        state = configure_backends(CPU, True)
        assert state["deterministic"] and not state["cudnn_benchmark"] and torch.are_deterministic_algorithms_enabled()
        gpu((8, 6))  # TF32 exists from Ampere on: what is on is recorded
        assert set(configure_backends(CUDA, False)["tf32"]) == {"matmul", "cudnn"}
    finally:
        configure_backends(CPU, False)


def test_models_avoid_ops_without_a_deterministic_cuda_backward():
    for cfg in (Config(width=8), Config(arch="imagenet_resnet18")):
        model = build_model(cfg, [0.5] * 3, [0.2] * 3, pretrained=False)
        kinds = {type(m) for m in model.modules()}
        assert torch.nn.AdaptiveAvgPool2d not in kinds, cfg.arch
        assert not any(type(m) is torch.nn.Conv2d and m.kernel_size == (1, 1) and m.stride != (1, 1)
                       for m in model.modules()), cfg.arch  # strided 1x1 convs are StridedPointwise
    conv = torch.nn.Conv2d(8, 16, 1, 2)
    x = torch.rand(3, 8, 8, 8)
    assert torch.allclose(StridedPointwise.like(conv)(x), conv(x), atol=1e-6)


def test_odd_batches_train_with_channels_last():
    # torch 2.14.1 crashed (heap corruption) on the weight gradient of a strided 1x1 conv for odd batches.
    for cfg in (Config(width=8), Config(arch="imagenet_resnet18", transfer_input="stem3x3")):
        model = build_model(cfg, [0.5] * 3, [0.2] * 3, pretrained=False).to(memory_format=torch.channels_last)
        x = torch.rand(5, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        F.cross_entropy(model(x), torch.randint(0, 10, (5,))).backward()
        assert all(p.grad is not None for p in model.parameters())


def test_deterministic_run_records_what_ran(data_dir, tmp_path):
    from common import run
    cfg = Config(width=8, epochs=1, train_subset=64, eval_subset=32, amp="off", deterministic=True,
                 data_dir=str(data_dir), results_dir=str(tmp_path))
    try:
        run(cfg)
    finally:
        configure_backends(CPU, False)
    import json
    metrics = json.loads((tmp_path / "01_base" / "seed-0" / "metrics.json").read_text())
    assert metrics["deterministic"] and not metrics["cudnn_benchmark"] and metrics["precision"] == "fp32"
    assert metrics["grad_scaler"] is False and metrics["tf32"] is None
    assert dataclasses.asdict(cfg)["deterministic"] == metrics["config"]["deterministic"]

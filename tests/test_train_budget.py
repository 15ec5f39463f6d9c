"""rflow.train.budget: the working memory of a LoRA step (not below what autograd actually saves), and an
offloaded base planned again for it by the trainer (fewer blocks resident; a budget that cannot hold a
step is a one-line error that changes nothing)."""

import pytest
import torch

from rflow.errors import UserError
from rflow.lora import add_lora_, lora_parameters
from rflow.models import flux
from rflow.runtime.offload import offload_, offload_plan, plan_offload
from rflow.train.adapters import init_weights, target_layers
from rflow.train.budget import replan_offload_, training_reserve
from rflow.train.data import read_dataset
from rflow.train.lora import LoRAConfig, LoRATrainer
from test_lora_train import CFG, shapes_folder, tiny_pipe

pytestmark = pytest.mark.usefixtures("one_thread")


def flux_model(D=128, M=512, double=2, single=2):
    c = flux.FluxConfig(hidden_size=D, num_heads=D // 64, in_channels=16, out_channels=16, context_in_dim=32, vec_in_dim=16,
                        axes_dim=(8, 28, 28), double_mlp=[(M, M)] * double, single_mlp=[M] * single)
    g = torch.Generator().manual_seed(0)
    m = flux.Flux(c)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 10))
    return m.requires_grad_(False)


def saved_bytes(model, n_img=64, n_txt=16) -> int:
    """What autograd saves for backward in one forward of ``model`` with a trainable LoRA (weights excluded)."""
    add_lora_(model, init_weights(model, target_layers(model, "attn,mlp"), 4, 4.0, 0), name="t", trainable=True)
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in frozen:
            total[0] += t.numel() * t.element_size()
        return t

    g = torch.Generator().manual_seed(1)
    side = int(n_img**0.5) * 2
    args = (torch.randn(1, n_img, 16, generator=g), flux.image_ids(side, side), torch.randn(1, n_txt, 32, generator=g),
            flux.text_ids(n_txt), torch.tensor([0.5]), torch.randn(1, 16, generator=g), torch.tensor([1.0]))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args).square().mean().backward()
    return total[0]


@pytest.mark.parametrize("D, M", [(128, 512), (128, 1024), (256, 512)])
def test_reserve_holds_what_autograd_saves_without_checkpointing(D, M):
    model = flux_model(D, M)
    tokens = 64 + 16
    measured = saved_bytes(model)
    est = training_reserve(model, "cpu", tokens=tokens, batch=1, checkpointing=False, trainable=0)
    assert measured <= est - 2**26 <= 1.5 * measured  # never below; 1.34-1.38 x with the slack and transient


def test_checkpointing_reserve_grows_with_blocks_by_their_inputs_only():
    few, many = flux_model(double=2, single=2), flux_model(double=4, single=8)
    kw = dict(tokens=4096 + 512, batch=1, trainable=0)
    a, b = (training_reserve(m, "cpu", checkpointing=True, **kw) for m in (few, many))
    plain = training_reserve(many, "cpu", checkpointing=False, **kw)
    per_input = 4 * 128 * (4096 + 512)  # float32 hidden states of one block input
    assert b - a == pytest.approx(1.25 * 8 * per_input, rel=1e-6)
    assert plain > 2.5 * b  # every block's activations against their inputs
    lora = training_reserve(few, "cpu", checkpointing=True, **dict(kw, trainable=10**6), ema=True) - a
    assert lora == 20 * 10**6  # weight, gradient, two AdamW moments, the EMA: float32 each


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes_folder(tmp_path_factory.mktemp("data"))


def test_trainer_plans_an_offloaded_base_again_for_a_step(data, tmp_path):
    cfg = LoRAConfig(**dict(CFG, steps=1, gradient_checkpointing=True))
    ref = LoRATrainer(tiny_pipe(), cfg, read_dataset(data), tmp_path / "ref")
    pipe = tiny_pipe()
    model = pipe.transformer
    tokens = pipe.family_module.image_seq_len(pipe.latent_shape(32, 32)) + pipe.max_sequence_length
    want = training_reserve(model, "cpu", tokens=tokens, batch=2, checkpointing=True,
                            trainable=sum(p.numel() for p in ref.params))
    every = plan_offload(model, mode="blocks", device="cpu", reserve=0)
    vram = every.resident_bytes + every.buffer_bytes + want  # a step fits only with every block streamed
    before = offload_(model, vram=vram, mode="blocks", device="cpu", reserve=2**20)
    assert not before.streamed  # with an inference-sized reserve everything fits
    tr = LoRATrainer(pipe, cfg, read_dataset(data), tmp_path / "run")
    plan = offload_plan(model)
    assert tr.offload is plan and plan.reserve == want and plan.budget == vram
    assert plan.streamed and plan.resident_bytes + plan.buffer_bytes + plan.reserve <= vram  # blocks moved out
    assert all(p.requires_grad for p in lora_parameters(model))  # the adapters stay trainable
    tr.run()
    ref.run()
    assert any(p.abs().sum() > 0 for p in tr.params[1::2])
    for x, y in zip(ref.params, tr.params):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)


def test_a_budget_too_small_for_a_step_is_an_error_that_changes_nothing(data, tmp_path):
    pipe = tiny_pipe()
    model = pipe.transformer
    every = plan_offload(model, mode="blocks", device="cpu", reserve=0)
    vram = every.resident_bytes + 4 * max(every.streamed_bytes // len(every.streamed), 1) + 2**20
    offload_(model, vram=vram, mode="blocks", device="cpu", reserve=2**20)
    before = offload_plan(model)
    big = LoRAConfig(**dict(CFG, steps=1, batch=4))  # no checkpointing: every block's activations
    with pytest.raises(UserError, match=r"vram .* below .* working reserve for a training step \(--gradient-checkpointing"):
        LoRATrainer(pipe, big, read_dataset(data), tmp_path / "run")
    assert offload_plan(model) is before and not any(".lora." in n for n, _ in model.named_modules())


def test_models_not_offloaded_or_streamed_without_a_budget_are_left_alone():
    model = flux_model()
    assert replan_offload_(model, 10**12) is None
    plan = offload_(model, mode="blocks", device="cpu")  # every block streamed: no budget to plan in
    assert replan_offload_(model, 10**12) is plan and plan.streamed


def test_cli_trains_within_an_offload_budget_or_says_it_cannot(capsys, data, tmp_path):
    from rflow.cli import main
    from rflow.loading import save_pipeline
    from rflow.lora import read_lora

    model_dir = tmp_path / "model"
    save_pipeline(tiny_pipe(), model_dir, dtype=torch.float32)
    args = ["train", "--model", str(model_dir), "--data", str(data), "--steps", "1", "--rank", "2", "--resolution", "32",
            "--batch", "2", "--gradient-checkpointing", "--device", "cpu", "--offload", "blocks"]
    assert main([*args, "--vram", "200MiB", "-o", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert "offload: all 4 blocks resident on cpu" in out.out + out.err and read_lora(tmp_path / "run" / "lora.safetensors").entries
    assert main([*args, "--vram", "2MiB", "-o", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rflow: error: --vram 2.0 MiB is below") and "working reserve" in err[0]
    assert not (tmp_path / "small" / "lora.safetensors").exists()


def test_a_quantized_base_reserves_the_dense_weights_autograd_keeps():
    from rflow.quant.api import quantize_

    plain = flux_model()
    q = flux_model()
    quantize_(q, "Q8_0")
    kw = dict(tokens=80, batch=1, trainable=0)
    blocks = [sum(p.numel() * 4 for n, p in plain.get_submodule(b).named_parameters() if n.endswith("weight")
                  and p.ndim == 2) for b in ("double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1")]
    ck = training_reserve(q, "cpu", checkpointing=True, **kw) - training_reserve(plain, "cpu", checkpointing=True, **kw)
    assert ck == max(blocks)  # one recomputed block's dequantized weights
    full = training_reserve(q, "cpu", checkpointing=False, **kw) - training_reserve(plain, "cpu", checkpointing=False, **kw)
    assert full == sum(blocks)

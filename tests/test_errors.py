"""Bad input: one test per case, asserting the error type and that the message names the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apt_viz import ArchitectureError, METHODS, PlanError, Pruner, PruningPlan, Sparsity, sparsify_weight
from apt_viz.checks import DataError, DeviceError, ModelError, check_device, check_model, check_plan, warn_tf32_override
from apt_viz.data import calibration_windows, load_text
from conftest import VOCAB, tiny_model, word_tokenizer


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- sparsity and N:M


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, "100%", "-5%"])
def test_sparsity_outside_unit_interval(bad):
    with pytest.raises(PlanError, match=r"must be in \[0, 1\).*e\.g\. 0\.5"):
        Sparsity.parse(bad)
    with pytest.raises(PlanError, match=r"\[0, 1\)"):
        PruningPlan(sparsity=bad if not isinstance(bad, str) else 1.0)


@pytest.mark.parametrize("bad", ["4:4", "5:4", "8:8", "0:4"])
def test_nm_with_n_not_below_m(bad):
    with pytest.raises(PlanError, match=r"need 1 <= N < M.*e\.g\. 2:4"):
        Sparsity.parse(bad)
    with pytest.raises(PlanError, match="N < M"):
        PruningPlan(pattern=bad)


def test_nm_m_not_dividing_the_layer_width(calib):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=68, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()  # down_proj reads 68 inputs: a multiple of 4, not of 8
    before = snapshot(model)
    p = Pruner(model)
    with pytest.raises(PlanError, match=r"multiple of 8.*model\.layers\.0\.mlp\.down_proj.*exclude them") as info:
        p.run(calib, PruningPlan(method="sparsegpt", pattern="4:8"), progress=False)
    assert "[68]" in str(info.value)
    assert unchanged(model, before) and not p.pruned  # checked before any weight changed
    # The fix the message names works, and re-pruning the misfit layer is refused before it changes.
    p.run(calib, PruningPlan(method="magnitude", pattern="4:8", exclude=["*.down_proj"]), progress=False)
    down = "model.layers.1.mlp.down_proj"
    dense_down = model.get_submodule(down).weight.detach().clone()
    with pytest.raises(PlanError, match=r"exclude it .*or choose an M that divides 68"):
        p.reprune(down, "4:8")
    assert torch.equal(model.get_submodule(down).weight, dense_down)
    assert down not in p.plan.overrides


@pytest.mark.parametrize("method", METHODS)
def test_every_method_supports_nm(method):
    """No method refuses N:M, so there is no 'unsupported method' error to give: each one prunes exactly."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 256, generator=g)
    W, H = torch.randn(8, 32, generator=g), 2 / 256 * X @ X.T
    PruningPlan(method=method, pattern="2:4").validate()
    res = sparsify_weight(W, H, "2:4", method)
    assert torch.all((~res.mask).reshape(8, -1, 4).sum(-1) == 2)


# --------------------------------------------------------------------------- layer names and plans


def test_pattern_matching_nothing_lists_nearest_real_names(calib):
    p = Pruner(tiny_model("llama"))
    with pytest.raises(PlanError, match=r"include pattern .* matches no layer; nearest names: .*model\.layers\.0\.self_attn\.q_proj.*fix the pattern"):
        p.run(calib, PruningPlan(include=["model.layers.0.self_atn.q_proj"]), progress=False)
    with pytest.raises(PlanError, match=r"override pattern '\*\.mlp\.up_prj' matches no layer; nearest names: .*up_proj"):
        p.run(calib, PruningPlan(overrides={"*.mlp.up_prj": {"sparsity": 0.3}}), progress=False)
    with pytest.raises(PlanError, match=r"no prunable layer .*nearest names: \['model\.layers\.1\.mlp\.down_proj'"):
        p.reprune("model.layers.1.mlp.down_prj", 0.5)
    with pytest.raises(PlanError, match="selects no layer.*widen include or narrow exclude"):
        p.run(calib, PruningPlan(exclude=["*"]), progress=False)
    assert not p.pruned


def test_plan_json_from_another_model(calib):
    opt_plan = PruningPlan.from_json(
        '{"method": "sparsegpt", "sparsity": 0.5, "include": ["model.decoder.layers.*"],'
        ' "overrides": {"model.decoder.layers.0.fc1": {"sparsity": 0.3}}}'
    )
    model = tiny_model("llama")
    before = snapshot(model)
    p = Pruner(model)
    with pytest.raises(PlanError, match=r"made for another model.*nearest names.*model\.layers\.\d.*rewrite the patterns") as info:
        p.run(calib, opt_plan, progress=False)
    assert "model.decoder.layers" in str(info.value)
    assert unchanged(model, before)
    # The same plan fits the model it was made for.
    check_plan(opt_plan, Pruner(tiny_model("opt")).layers)
    # A plan for a deeper model of the same family names blocks this one does not have.
    deeper = PruningPlan(overrides={"model.layers.5.*": {"sparsity": 0.7}})
    with pytest.raises(PlanError, match=r"made for another model.*'model\.layers\.5\.\*'"):
        check_plan(deeper, p.layers)


# --------------------------------------------------------------------------- architecture


class _NoBlocks(nn.Module):
    """Linears, but no ModuleList of identical blocks (a list of two different kinds)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleList([nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))])


@pytest.mark.parametrize("model", [nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4)), _NoBlocks()], ids=["sequential", "mixed-list"])
def test_architecture_without_decoder_blocks(model):
    with pytest.raises(ArchitectureError, match=r"found no decoder blocks.*Pass a causal LM whose decoder layers sit in an nn\.ModuleList"):
        Pruner(model)


# --------------------------------------------------------------------------- text and tokens


def test_calibration_text_shorter_than_one_window():
    tok = word_tokenizer(20)
    with pytest.raises(DataError, match=r"found 5 tokens, need at least 17.*longer text or a smaller seqlen"):
        calibration_windows(tok, "w1 w2 w3 w4 w5", nsamples=4, seqlen=16)
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("content", ["", "  \n\n\t "])
def test_empty_file(tmp_path, content):
    path = tmp_path / "calib.txt"
    path.write_text(content)
    with pytest.raises(DataError, match="is empty.*pass a file that holds the text"):
        load_text(path)


@pytest.mark.parametrize("bad,fix", [
    (torch.zeros(16, dtype=torch.long), r"ids\[None\]"),
    (torch.zeros(2, 16), "integer token ids.*calibration_windows"),
    (torch.zeros(0, 16, dtype=torch.long), "non-empty.*calibration_windows"),
    (torch.full((2, 16), VOCAB), "outside the model's vocabulary.*model's own tokenizer"),
    (torch.zeros(1, 200, dtype=torch.long), r"longer than the model's 128 positions; use seqlen <= 128"),
], ids=["1-d", "float", "empty", "out-of-vocab", "too-long"])
def test_bad_calibration_tokens(bad, fix):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(DataError, match=fix):
        Pruner(model).run(bad, PruningPlan(method="magnitude"), progress=False)
    assert unchanged(model, before)


# --------------------------------------------------------------------------- model form


def test_model_on_meta_device():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(ModelError, match="'meta' device.*load the model with real weights"):
        Pruner(model)


class Linear8bitLt(nn.Module):
    """Stands in for bitsandbytes' int8 linear: an int8 weight and a scale."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, m, dtype=torch.int8), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(n))


def _quantize_config(model):
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}


def _quantize_config_4bit(model):
    from types import SimpleNamespace

    model.config.quantization_config = SimpleNamespace(quant_method="bitsandbytes", load_in_4bit=True)


class Linear4bit(Linear8bitLt):
    """Stands in for bitsandbytes' 4-bit linear (packed uint8 weight)."""


def _int4_module(model):
    model.model.layers[1].mlp.up_proj = Linear4bit(128, 32)


def _quantized_flag(model):
    model.is_quantized = True


def _int8_module(model):
    model.model.layers[0].mlp.down_proj = Linear8bitLt(64, 128)


def _int8_weight(model):
    lin = model.model.layers[1].self_attn.q_proj
    lin.weight = nn.Parameter(torch.zeros_like(lin.weight, dtype=torch.int8), requires_grad=False)


@pytest.mark.parametrize("quantize,why", [
    (_quantize_config, "quant_method='bitsandbytes'"),
    (_quantize_config_4bit, "quant_method='bitsandbytes'"),
    (_int4_module, "quantized Linear4bit"),
    (_quantized_flag, "model.is_quantized"),
    (_int8_module, "quantized Linear8bitLt"),
    (_int8_weight, "stored as int8"),
], ids=["config", "config-4bit", "module-4bit", "flag", "module", "int8-weight"])
def test_quantized_model_names_the_float_checkpoint(quantize, why):
    model = tiny_model("llama")
    quantize(model)
    with pytest.raises(ModelError, match=rf"quantized \(.*{why}.*load the original float checkpoint") as info:
        Pruner(model)
    assert "load_in_8bit" in str(info.value)


def test_load_model_refuses_a_quantized_checkpoint(monkeypatch, tmp_path):
    from apt_viz import models

    class QuantizedHub:
        @staticmethod
        def from_pretrained(*a, **k):
            model = tiny_model("llama")
            _quantize_config(model)
            return model

    monkeypatch.setattr(models, "AutoModelForCausalLM", QuantizedHub)
    with pytest.raises(ModelError, match="quantized.*load the original float checkpoint"):
        models.load_model(tmp_path / "some-int8-model")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mamba"])
def test_float_models_pass_the_model_checks(arch):
    model = tiny_model(arch)
    check_model(model)
    check_model(model.to(torch.bfloat16))


# --------------------------------------------------------------------------- device


def _missing_cuda() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda:7"


@pytest.mark.parametrize("dev", [_missing_cuda(), "tpu", "meta", "cuda:notanumber"])
def test_device_that_does_not_exist(dev):
    with pytest.raises(DeviceError, match=r"available devices: cpu.*pass one of them, e\.g\. device='cpu'") as info:
        Pruner(tiny_model("llama"), device=dev)
    assert repr(dev) in str(info.value)
    with pytest.raises(DeviceError):
        check_device(dev)
    assert check_device("cpu") == torch.device("cpu")


def test_a_tf32_override_in_the_environment_is_named_for_cuda(monkeypatch):
    import warnings

    name = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"
    monkeypatch.delenv(name, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_tf32_override(torch.device("cuda:0"))
        monkeypatch.setenv(name, "0")
        warn_tf32_override(torch.device("cuda:0"))
        monkeypatch.setenv(name, "1")
        warn_tf32_override(torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match=rf"{name}=1 in the environment.*set {name}=0 before starting Python"):
        warn_tf32_override(torch.device("cuda:0"))

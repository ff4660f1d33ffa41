"""Causal LMs: data-aware fits (every structure), block-by-block calibration, perplexity, the CLI path."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import toy_tokenizer
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dsformer.calibration import InputMoments, compress_calibrated
from dsformer.checkpoint import load, save
from dsformer.cli import main
from dsformer.harness.lm import calibration_batches, cut_windows, eval_windows, perplexity, read_text
from dsformer.harness.tasks import DataError
from dsformer.structures import DenseSparseConfig, LowRankConfig, NMConfig
from dsformer.structures.dense_sparse.aware import refine_columns
from dsformer.structures.whitening import output_error, whitening
from dsformer.surgery import CompressConfig, compact_layers, compress, find_targets

VOCAB = 100


def tiny_lm(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True)).eval()
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if family == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, sliding_window=16)).eval()
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(config).eval()


FAMILIES = ["llama", "qwen2", "gemma3", "gpt2"]


def batches(count: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 24), generator=gen)} for _ in range(count)]


def fast(name: str, ratio: float = 2.0):
    return {
        "ds": DenseSparseConfig(ratio=ratio, iters=4, search_iters=1, search_points=2),
        "svd": LowRankConfig(ratio=ratio),
        "nm": NMConfig(ratio=ratio),
    }[name]


def correlated_inputs(width: int, tokens: int = 4000, seed: int = 0) -> torch.Tensor:
    """Inputs with a few large, correlated directions, as transformer activations have."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen) * torch.logspace(0, -2, width)
    return torch.randn(tokens, width, generator=gen) @ mix


@pytest.mark.parametrize("name", ["ds", "svd", "nm"])
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_data_aware_fit_lowers_the_output_error(name, shape):
    torch.manual_seed(1)
    w = torch.randn(*shape)
    x = correlated_inputs(shape[1])
    gram = x.T @ x / len(x)
    (free,) = fast(name).fit([w])
    (aware,) = fast(name).fit([w], inputs=[gram])
    assert output_error(w, aware.reconstruct(), gram) < output_error(w, free.reconstruct(), gram)
    assert aware.layout == free.layout or name == "ds"  # the budget is the same; DS may pick another k


def test_whitened_svd_is_the_best_rank_r_output_fit():
    torch.manual_seed(2)
    w, x = torch.randn(24, 16), correlated_inputs(16)
    gram = x.T @ x / len(x)
    (fit,) = LowRankConfig(rank=4).fit([w], inputs=[gram])
    white = whitening(gram)
    u, s, vh = torch.linalg.svd(w.double() @ white.root)
    best = (u[:, :4] * s[:4]) @ vh[:4] @ white.inverse
    assert torch.allclose(fit.reconstruct().double(), best, atol=1e-4)


def test_column_refinement_never_raises_the_output_error():
    torch.manual_seed(3)
    w, x = torch.randn(24, 64), correlated_inputs(64)
    gram = x.T @ x / len(x)
    (start,) = fast("ds").fit([w])  # a start fitted without the metric
    refined = refine_columns(start, w, gram)
    assert not start.layout.rows
    assert output_error(w, refined.reconstruct(), gram) <= output_error(w, start.reconstruct(), gram) + 1e-9
    assert torch.equal(refined.indices, start.indices)  # the support is fixed


def test_input_moments_match_the_inputs_and_share_one_sum():
    model = tiny_lm("llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"]
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = args[0]

        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    moments = InputMoments({n: model.get_submodule(n) for n in names})
    with torch.no_grad():
        model(**batches(1)[0])
    grams = moments.moments()
    moments.remove()
    for hook in hooks:
        hook.remove()
    for name in names:
        x = seen[name].reshape(-1, seen[name].shape[-1]).double()
        assert torch.allclose(grams[name], x.T @ x / len(x), atol=1e-6)
    assert grams[names[0]] is grams[names[1]]  # q and k read the same tensor: one sum


@pytest.mark.parametrize("family", FAMILIES)
def test_calibrated_compression_of_each_family_saves_and_loads(family, tmp_path):
    model = tiny_lm(family)
    if len(set(getattr(model.config, "layer_types", None) or ())) > 1:  # Gemma3: sliding and full attention
        with pytest.raises(Exception, match="mixes layer types"):
            compress_calibrated(model, CompressConfig(fast("ds")), batches(), progress=False)
        assert not compact_layers(model)  # refused before any change
        return
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    report = compress_calibrated(model, CompressConfig(fast("ds")), batches(), progress=False)
    assert len(report.layers) == len(find_targets(tiny_lm(family)))
    assert all(r.output_error is not None and r.output_error < 1 for r in report.layers)
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    ids = batches(1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save(model, tmp_path / "lm", report=report)
    loaded = load(tmp_path / "lm")
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, before, atol=1e-5)


def test_calibrated_block_fits_beat_weight_fits_on_the_model_output():
    ids = batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        dense = tiny_lm("llama")(input_ids=ids).logits
    outputs = {}
    for aware in (False, True):
        model = tiny_lm("llama")
        config = CompressConfig(LowRankConfig(ratio=2.0))
        if aware:
            compress_calibrated(model, config, batches(8), progress=False)
        else:
            compress(model, config, progress=False)
        with torch.no_grad():
            outputs[aware] = (model(input_ids=ids).logits - dense).norm() / dense.norm()
    assert outputs[True] < outputs[False]


def test_calibration_refuses_targets_outside_the_blocks():
    model = tiny_lm("llama")
    config = CompressConfig(fast("svd"), target_modules=["lm_head", "q_proj"])
    with pytest.raises(Exception, match="outside"):
        compress_calibrated(model, config, batches(), progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear)  # nothing was changed


def test_a_singular_input_metric_is_damped():
    x = torch.randn(3, 16)  # fewer tokens than inputs
    white = whitening(x.T @ x / 3)
    assert white.damping > 0
    assert torch.isfinite(white.inverse).all()


def test_perplexity_is_the_exponential_of_the_mean_token_loss():
    model = tiny_lm("llama")
    windows = cut_windows(torch.randint(0, VOCAB, (70,), generator=torch.Generator().manual_seed(0)), 16)
    assert windows.shape == (4, 16)
    result = perplexity(model, windows, batch_size=3, progress=False)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    assert result["tokens"] == 4 * 15 and result["window"] == 16
    assert math.isclose(result["perplexity"], math.exp(float(nll)), rel_tol=1e-5)


def test_perplexity_needs_a_language_model_head(make_model):
    with pytest.raises(Exception, match="language-model head"):
        perplexity(make_model("bert"), torch.zeros(1, 8, dtype=torch.long), progress=False)


def test_text_windows_and_seeded_calibration(lm_folder):
    folder, text = lm_folder
    tokenizer = toy_tokenizer(folder.parent)
    content = read_text(str(text), "calibration")
    assert eval_windows(tokenizer, content, 16).shape[1] == 16
    one, two = (calibration_batches(tokenizer, content, 5, 16, seed=3, batch_size=2) for _ in range(2))
    assert [b["input_ids"].shape[0] for b in one] == [2, 2, 1]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, two, strict=True))
    with pytest.raises(DataError, match="fewer tokens than one window"):
        eval_windows(tokenizer, "good film", 16)


def test_cli_compresses_with_calibration_and_reports_perplexity(lm_folder, tmp_path, capsys):
    folder, text = lm_folder
    out = tmp_path / "compressed"
    args = ["compress", "--model", str(folder), "--structure", "svd", "--calibration", str(text),
            "--samples", "4", "--length", "16", "--output", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "output_error" in capsys.readouterr().out
    for model in (str(folder), str(out)):
        assert main(["evaluate", model, "--task", str(text), "--window", "16", "--quiet"]) == 0
        assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("family", [*FAMILIES, "bert"])
def test_the_global_budget_is_the_default_of_every_model_that_generates(family, make_model):
    from dsformer.harness.runs import Calibration

    model = make_model("bert") if family == "bert" else tiny_lm(family)
    for name in ("ds", "svd"):
        assert Calibration("text").wants_global_budget(model, CompressConfig(fast(name))) == (family != "bert")
    assert not Calibration("text", global_budget=False).wants_global_budget(model, CompressConfig(fast("svd")))


@pytest.mark.parametrize(
    "args, global_budget",
    [
        (["--structure", "svd"], True),  # a causal LM gets the global budget by default
        (["--structure", "svd", "--no-global-budget"], False),
        (["--structure", "ds", "--global-budget"], True),
        (["--structure", "nm"], False),  # N:M takes no per-layer ratios: one for all, no error
        (["--structure", "svd", "--option", "rank=4"], False),  # a size fixed by an option: not the allocator's
    ],
)
def test_cli_gives_causal_lms_the_global_budget_by_default(lm_folder, tmp_path, args, global_budget):
    folder, text = lm_folder
    record = tmp_path / "report.json"
    argv = ["compress", "--model", str(folder), "--calibration", str(text), "--samples", "4", "--length", "16",
            "--no-save", "--json", str(record), "--quiet", *args]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(record.read_text())
    assert any("global budget" in note for note in report["notes"]) == global_budget
    ratios = [layer["dense_params"] / layer["params"] for layer in report["layers"]]
    if "--option" not in args:  # a fixed rank gives each shape its own ratio
        assert (max(ratios) / min(ratios) > 1.25) == global_budget  # one ratio for all differs by rounding only


@pytest.mark.parametrize(
    "args, message",
    [
        (["--calibration", "no-such-file.txt"], "neither a language-modelling task"),
        (["--calibration", "wikitext2", "--data-dir", "."], "has no wiki.valid.tokens"),
        (["--length", "16"], "give --calibration"),
        (["--global-budget"], "give --calibration"),
        (["--no-global-budget"], "give --calibration"),
        (["--calibration", "CORPUS", "--structure", "nm", "--global-budget"], "any ratio"),
        (["--calibration", "CORPUS", "--option", "share_basis=true"], "share_basis"),
    ],
)
def test_cli_refuses_bad_calibration_before_loading(lm_folder, tmp_path, capsys, args, message):
    folder, corpus = lm_folder
    out = tmp_path / "never"
    args = [str(corpus) if a == "CORPUS" else a for a in args]
    assert main(["compress", "--model", str(folder), "--output", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_perplexity_of_an_encoder_is_refused(make_model, lm_folder, tmp_path, capsys):
    _, text = lm_folder
    encoder = tmp_path / "encoder"
    make_model("bert").save_pretrained(encoder)
    toy_tokenizer(tmp_path).save_pretrained(encoder)
    assert main(["evaluate", str(encoder), "--task", str(text), "--window", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has no language-model head" in err and len(err.strip().splitlines()) == 1


def test_byte_budget_counts_the_indices():
    for out_features, in_features in [(96, 64), (64, 96), (600, 300)]:
        config = DenseSparseConfig(ratio=2.0, budget="bytes")
        dense_bytes = 4 * out_features * in_features
        for lay in config.candidates(out_features, in_features):
            assert lay.stored_bytes(4) <= dense_bytes / 2.0
            assert lay.stored_bytes(4) > dense_bytes / 2.0 * 0.9  # nearly all of it spent
            assert lay.ratio > 2.0  # the indices cost values: more than 2x by parameters
    with pytest.raises(Exception, match="budget is params or bytes"):
        DenseSparseConfig(budget="pages")


def _weights_and_grams(count: int = 4):
    """Layer i has a spectrum that decays more slowly with i: later layers have more to lose."""
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for i in range(count):
        u, _, vh = torch.linalg.svd(torch.randn(48, 32, generator=gen), full_matrices=False)
        weights[f"layer{i}"] = (u * torch.linspace(0, -6 / (i + 1), 32).exp()) @ vh
    grams = {name: torch.eye(32) for name in weights}
    return weights, grams


@pytest.mark.parametrize("ratio", [1.5, 2.0, 3.0])
def test_allocation_spends_the_budget_and_loses_less_than_one_ratio_for_all(ratio):
    from dsformer.allocation import allocate, choices_for, truncation_losses

    weights, grams = _weights_and_grams()
    ratios = allocate(weights, grams, ratio)
    dense = sum(w.numel() for w in weights.values())
    spent = sum(weights[name].numel() / r for name, r in ratios.items())
    assert spent <= dense / ratio + 1e-6
    assert spent >= 0.9 * dense / ratio
    choices = choices_for(ratio)
    curves = {
        name: dict(zip(choices, truncation_losses(w, grams[name], choices), strict=True)) for name, w in weights.items()
    }
    assert sum(curves[name][r] for name, r in ratios.items()) <= sum(curve[ratio] for curve in curves.values()) + 1e-9
    assert len(set(ratios.values())) > 1


def test_allocation_keeps_fixed_layers_and_refuses_what_it_cannot_meet():
    from dsformer.allocation import allocate

    weights, grams = _weights_and_grams()
    assert allocate(weights, grams, 2.0, fixed={"layer0": 1.5})["layer0"] == 1.5
    with pytest.raises(Exception, match="smaller ratio"):
        allocate(weights, grams, 4.0, choices=[1.5, 2.0])


def test_truncation_losses_shrink_as_the_ratio_does():
    from dsformer.allocation import truncation_losses

    w, x = torch.randn(48, 32), correlated_inputs(32)
    losses = truncation_losses(w, x.T @ x / len(x), [1.2, 1.5, 2.0, 4.0])
    assert losses == sorted(losses) and losses[0] >= 0


def test_weighed_by_the_loss_the_estimate_is_the_fisher_weighted_output_error_of_svd_llm():
    from dsformer.allocation import truncation_losses
    from dsformer.structures import LowRankConfig
    from dsformer.structures.whitening import whitening

    w, x = torch.randn(24, 16), correlated_inputs(16)
    gram = x.T @ x / len(x)
    f = torch.rand(24) + 0.1
    (fitted,) = LowRankConfig(ratio=2.0).fit([w], inputs=[gram])
    delta = (w - fitted.reconstruct()).double()
    metric = whitening(gram).gram  # the damped moment both whiten with
    expected = float((f.double() * (delta @ metric @ delta.T).diagonal()).sum())  # Σ_i f_i ||ΔY_i||² / tokens
    assert truncation_losses(w, gram, [2.0], f)[0] == pytest.approx(expected, rel=1e-4)
    assert truncation_losses(w, gram, [2.0], torch.zeros(24))[0] == 0.0


@pytest.mark.parametrize(
    ("sensitivity", "keeps_more"),
    [((1.0, 1.0), None), ((100.0, 1.0), "layer0"), ((1.0, 100.0), "layer1")],
)
def test_the_layer_whose_errors_cost_more_keeps_more(sensitivity, keeps_more):
    from dsformer.allocation import allocate

    gen = torch.Generator().manual_seed(1)
    weights = {f"layer{i}": torch.randn(32, 32, generator=gen) for i in range(2)}
    grams = {name: torch.eye(32) for name in weights}
    sensitivities = {name: torch.full((32,), f) for name, f in zip(weights, sensitivity, strict=True)}
    ratios = allocate(weights, grams, 2.0, sensitivities=sensitivities)
    if keeps_more is None:
        assert abs(ratios["layer0"] - ratios["layer1"]) <= 0.5
    else:
        other = next(name for name in weights if name != keeps_more)
        assert ratios[keeps_more] < ratios[other]


def test_a_layer_that_got_no_gradient_is_compressed_most():
    from dsformer.allocation import allocate, choices_for

    weights, grams = _weights_and_grams()
    sensitivities = {name: torch.ones(48) for name in weights if name != "layer3"}
    ratios = allocate(weights, grams, 2.0, sensitivities=sensitivities)
    assert ratios["layer3"] == max(choices_for(2.0))


def test_output_sensitivity_is_the_mean_squared_gradient_at_each_output():
    from dsformer.calibration import OutputSensitivity

    layer = torch.nn.Linear(6, 4)
    x = torch.randn(3, 5, 6)
    hooks = OutputSensitivity({"layer": layer})
    y = layer(x)
    (y.pow(3).sum()).backward()
    hooks.remove()
    expected = (3 * y.detach().pow(2)).pow(2).reshape(-1, 4).mean(0)
    assert torch.allclose(hooks.means()["layer"].float(), expected, rtol=1e-5)


@pytest.fixture
def allocated(monkeypatch) -> dict:
    """What the global budget hands the allocator, recorded (the allocation itself runs as usual)."""
    import dsformer.calibration as calibration

    seen: dict = {}
    real = calibration.allocate_structures

    def spy(base, structures, weights, grams, sensitivities=None):
        seen["sensitivities"] = sensitivities
        return real(base, structures, weights, grams, sensitivities)

    monkeypatch.setattr(calibration, "allocate_structures", spy)
    return seen


def test_a_causal_lm_gives_the_global_budget_its_loss_gradients(allocated):
    model = tiny_lm("llama")
    compress_calibrated(model, CompressConfig(fast("svd", 2.0)), batches(), False, global_budget=True)
    sensitivities = allocated["sensitivities"]
    assert sensitivities is not None and len(sensitivities) == 14
    assert all(v.min() >= 0 and v.sum() > 0 for v in sensitivities.values())
    assert all(p.grad is None for p in model.parameters())  # no copy of the weights was made
    assert all(p.requires_grad for p in model.parameters())  # frozen for the pass only


def test_without_gradients_the_global_budget_falls_back_to_shares_of_the_output(allocated):
    with torch.inference_mode():
        report = compress_calibrated(tiny_lm("llama"), CompressConfig(fast("svd", 2.0)), batches(), False, True)
    assert allocated["sensitivities"] is None and 1.9 <= report.ratio_params <= 2.2


@pytest.mark.parametrize("name", ["ds", "svd"])
def test_calibrated_compression_with_a_global_budget(name):
    model = tiny_lm("llama")
    report = compress_calibrated(model, CompressConfig(fast(name, 2.0)), batches(), False, global_budget=True)
    ratios = {round(r.dense_params / r.params, 1) for r in report.layers}
    assert len(ratios) > 1  # the layers got different ratios
    assert 1.9 <= report.ratio_params <= 2.2


def test_a_global_budget_needs_a_structure_with_free_ratios():
    with pytest.raises(Exception, match="any ratio"):
        compress_calibrated(tiny_lm("llama"), CompressConfig(fast("nm")), batches(), False, global_budget=True)


def test_too_little_calibration_text_is_damped_and_said():
    few = [{"input_ids": torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))}]
    report = compress_calibrated(tiny_lm("llama"), CompressConfig(fast("svd")), few, progress=False)
    assert any("singular and was damped" in note for note in report.notes)
    assert "note: " in report.table()
    enough = compress_calibrated(tiny_lm("llama"), CompressConfig(fast("svd")), batches(8), progress=False)
    assert not enough.notes


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_is_the_same_through_every_backend(family):
    """The decode path (one token a step, the KV cache) computes what the reference path computes: the
    compressed model's greedy tokens are the same on every backend it has."""
    from dsformer.harness.lm_bench import greedy
    from dsformer.kernels import use_backend

    model = tiny_lm(family)
    compress(model, CompressConfig(fast("ds")), progress=False)
    prompt = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    generated = {}
    for backend in ("reference", "gather", "dense", "auto"):
        use_backend(model, backend)
        generated[backend] = greedy(model, prompt, 10)[0]
    assert len(generated["reference"]) == 10
    assert all(tokens == generated["reference"] for tokens in generated.values()), generated


def test_bench_of_a_causal_lm_times_prefill_and_decode(capsys, lm_folder, tmp_path):
    folder, _ = lm_folder
    out = tmp_path / "bench.json"
    argv = ["bench", str(folder), "--ratio", "2", "--option", "iters=4", "search_iters=1", "search_points=2",
            "--seq", "16", "--new-tokens", "6", "--repeats", "1", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "prefill 1 x 16" in printed and "decode at batch 1, 6 greedy tokens" in printed
    (run,) = json.loads(out.read_text())["runs"]
    assert run["prefill_end_to_end"]["speedup"] > 0 and run["decode_end_to_end"]["speedup"] > 0
    assert {len(tokens) for tokens in run["generations"].values()} == {6}
    assert len(run["decode_layers"]) == len(run["prefill_layers"]) == 14  # 7 linears in each of 2 blocks
    assert all(layer["byte_limit"] > 1 for layer in run["decode_layers"].values())


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--batch", "2"], "batch 1"),
        (["--seq", "80"], "--seq 80: the model reads at most 64"),
        (["--seq", "16", "--new-tokens", "40"], "--new-tokens 40 after the 32-token prompt"),
        (["--seq", "16", "--new-tokens", "1"], "at least 2"),
    ],
)
def test_bench_of_a_causal_lm_refuses_what_it_cannot_time(capsys, lm_folder, extra, words):
    folder, _ = lm_folder
    assert main(["bench", str(folder), "--ratio", "2", "--repeats", "1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1

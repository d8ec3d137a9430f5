"""EAGLE heads with EAGLE-2 dynamic trees: drafting changes nothing (greedy output equals plain
decoding; seeded sampling equals plain sampling, the drafts being deterministic), the tree is a
tree of the best paths, a head for another model is refused, and `onepass train eagle` runs end
to end on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from test_medusa import PROMPTS, outputs
from test_train import truncated_file

from onepass import SamplingParams
from onepass.errors import InputError
from onepass.heads.eagle import EagleHead
from onepass.heads.files import llm_target, save_heads


def write_head(llm, path, copy: bool = False, draft_vocab: int = 512, seed: int = 0):
    """A head for `llm`: random (PyTorch's initialization), or with copy=True one whose output
    is its input feature (g_t = h_t: it guesses that the root repeats, which real text
    sometimes accepts)."""
    c = llm.model_config
    torch.manual_seed(seed)
    vocab = torch.arange(min(draft_vocab, c.vocab_size))
    head = EagleHead(
        c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, 64, c.rope_theta, 1e-6, vocab
    )
    if copy:
        with torch.no_grad():
            h = c.hidden_size
            head.fc.weight.zero_()
            head.fc.weight[:, :h] = torch.eye(h)
            head.fc.bias.zero_()
            head.o.weight.zero_()
            head.down.weight.zero_()
    save_heads(path, "eagle", llm_target(llm), head.config(), head.tensors(), {})
    return str(path)


@pytest.mark.parametrize("options", [{}, {"depth": 2, "top_k": 2, "max_nodes": 3}])
def test_greedy_output_is_plain_greedy_output(tiny_llm, tmp_path, options):
    spec = {"method": "eagle", "heads": write_head(tiny_llm, tmp_path), **options}
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain, _ = outputs(tiny_llm, PROMPTS, params)
    fast, results = outputs(tiny_llm, PROMPTS, params, spec)
    assert fast == plain
    assert all(r.metrics.spec.num_drafts > 0 for r in results)


def test_seeded_sampling_equals_plain_sampling(tiny_llm, tmp_path):
    spec = {"method": "eagle", "heads": write_head(tiny_llm, tmp_path)}
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=5, max_tokens=40, ignore_eos=True)
    plain, _ = outputs(tiny_llm, PROMPTS, params)
    fast, results = outputs(tiny_llm, PROMPTS, params, spec)
    assert fast == plain
    assert all(r.metrics.spec.num_drafts > 0 for r in results)


def test_the_dynamic_tree_keeps_the_best_paths(tiny_llm, tmp_path):
    from onepass.draft import DecodeState
    from onepass.drafters import DraftContext
    from onepass.drafters.eagle import Options, build
    from onepass.models.base import ModelOutput

    context = DraftContext(
        tiny_llm.backend,
        tiny_llm.model_config.vocab_size,
        None,
        model_name=tiny_llm.model_name,
        model_key=tiny_llm._model_key,
    )
    options = Options(heads=write_head(tiny_llm, tmp_path), max_nodes=6, depth=3, top_k=3)
    drafter = build(options, context)
    drafter.start([1, 2, 3])
    assert len(drafter.propose(DecodeState([1, 2, 3, 4], 3, 64, 64))) == 0  # nothing seen yet
    hidden = torch.randn(1, tiny_llm.model_config.hidden_size)
    drafter.observe_prompt(ModelOutput(torch.zeros(1, 8), hidden), 4)
    draft = drafter.propose(DecodeState([1, 2, 3, 4], 3, 64, 64))
    assert len(draft) == 6 and max(draft.tree.depths) <= 3
    assert drafter.length == 1  # the draft rows left the head's cache
    # Every kept node's path is at least as likely as any dropped node's, so the tree grows
    # from the root's best child.
    assert draft.tree.parents[0] == -1


def test_a_head_for_another_model_is_refused(llm, tiny_llm, tmp_path):
    heads = write_head(llm, tmp_path)
    with pytest.raises(InputError) as error:
        tiny_llm.generate("Hi", speculative_config={"method": "eagle", "heads": heads})
    assert llm.model_name in str(error.value) and tiny_llm.model_name in str(error.value)


def test_train_eagle_on_the_tiny_model_and_decode(tiny_llm, tmp_path):
    from onepass.train.eagle import make_trainer
    from onepass.train.loop import TrainConfig, train

    data = truncated_file(tmp_path / "data.json", 14)
    output = tmp_path / "head"
    config = TrainConfig(
        method="eagle",
        model=str(tiny_llm.cache_dir.parent),
        cache_dir=str(tmp_path / "cache"),
        data=str(data),
        max_samples=12,
        epochs=40,
        batch=4,
        lr=3e-3,
        max_length=96,
        eval_samples=2,
        max_steps=30,
        output=str(output),
        extra={"draft_vocab": 256, "intermediate_size": 64},
    )
    summary = train(config, make_trainer, lambda message: None)
    assert summary["steps"] == 30
    curve = json.loads((output / "curve.json").read_text())["train"]
    assert curve[-1]["loss"] < 0.85 * curve[0]["loss"]
    spec = {"method": "eagle", "heads": str(output)}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = tiny_llm.generate("Count from one", params)[0].outputs[0].token_ids
    fast = tiny_llm.generate("Count from one", params, speculative_config=spec)[0]
    assert fast.outputs[0].token_ids == plain
    assert fast.metrics.spec.num_drafts > 0


@pytest.mark.real_model
def test_greedy_identity_on_the_default_model(llm, tmp_path):
    from lossless import PROMPTS as KINDS
    from lossless import compare_greedy

    spec = {"method": "eagle", "heads": write_head(llm, tmp_path, copy=True, draft_vocab=8192)}
    ids = llm.chat_token_ids([{"role": "user", "content": KINDS["math"]}])
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids
    fast = llm.generate({"prompt_token_ids": ids}, params, speculative_config=spec)[0]
    if fast.outputs[0].token_ids != plain:
        result = compare_greedy(llm, ids, spec, 48)
        assert result.near_tie, f"differs at token {result.first_difference}, not a near-tie"
    assert fast.metrics.spec.num_accepted_tokens > 0  # the check has teeth


def test_the_heads_cached_steps_equal_its_whole_sequence_forward():
    """Drafting feeds rows a few at a time through the head's KV cache, training feeds whole
    sequences: the same outputs, or the head drafts from what it was not trained on."""
    torch.manual_seed(0)
    head = EagleHead(32, 4, 2, 8, 48, 10000.0, 1e-6, torch.arange(50)).eval()
    hidden, embedded = torch.randn(7, 32), torch.randn(7, 32)
    positions = torch.arange(10, 17)
    with torch.no_grad():
        whole = head(hidden, embedded, positions)
        cache = (torch.zeros(16, 2, 8), torch.zeros(16, 2, 8))
        parts = [
            head(hidden[a:b], embedded[a:b], positions[a:b], cache, a)
            for a, b in ((0, 3), (3, 4), (4, 7))
        ]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)


def test_the_heads_projections_on_the_targets_gemm_give_its_own_outputs(llm):
    """Drafting runs the head's matrices on the target's GEMM kernels (NativeDecoder.linear)."""
    torch.manual_seed(1)
    c = llm.model_config
    head = EagleHead(
        c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, 64, 1e4, 1e-6, torch.arange(8)
    ).eval()
    linears = {name: llm.backend.linear(m.weight, m.bias) for name, m in head.projections().items()}
    hidden, embedded = torch.randn(3, c.hidden_size), torch.randn(3, c.hidden_size)
    with torch.no_grad():
        ours = head(hidden, embedded, torch.arange(3))
        theirs = head(hidden, embedded, torch.arange(3), linears=linears)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_the_unrolled_training_passes_equal_drafting_a_chain(passes):
    """Training pass d at row j must compute what drafting computes at depth d + 1 from the true
    rows up to j - d: the head reads its own guesses one position at a time over its cache.
    Otherwise the head learns depths it never drafts."""
    from onepass.train.eagle import unrolled

    torch.manual_seed(2)
    head = EagleHead(32, 4, 2, 8, 48, 10000.0, 1e-6, torch.arange(50)).eval()
    n = 6
    hidden, embedded = torch.randn(n, 32), torch.randn(n, 32)
    positions = torch.arange(20, 20 + n)
    with torch.no_grad():
        trained = unrolled(head, hidden, hidden[:1], embedded, positions, passes)
        for d in range(passes):
            for j in range(d, n):
                cache = (torch.zeros(n, 2, 8), torch.zeros(n, 2, 8))
                root = j - d  # the last true row: the cache holds rows 0..root
                g = head(hidden[: root + 1], embedded[: root + 1], positions[: root + 1], cache)
                g = g[-1]
                for k in range(root + 1, j + 1):  # one draft row per depth, reading its guess
                    g = head(g[None], embedded[k : k + 1], positions[k : k + 1], cache, k)[0]
                torch.testing.assert_close(trained[d][j], g, rtol=1e-5, atol=1e-5)


def test_the_tree_is_cut_to_the_nodes_that_pay_for_their_rows(tiny_llm, tmp_path, monkeypatch):
    """Alone, eagle sends only the nodes whose path probabilities pay for their rows on the
    target's cost curve: where a row costs a whole step, none; the output stays plain."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = tiny_llm.generate("Count from one", params)[0].outputs[0].token_ids
    sent = []
    for name, cost in (("free", 1.0), ("dear", None)):  # None: a row costs a step
        spec = {"method": "eagle", "heads": write_head(tiny_llm, tmp_path / name, copy=True)}
        curve = lambda self, cost=cost: lambda rows, context=None: cost or float(rows)  # noqa: E731
        monkeypatch.setattr(type(tiny_llm), "_live_cost_model", curve)
        out = tiny_llm.generate("Count from one", params, speculative_config=spec)[0]
        assert out.outputs[0].token_ids == plain
        sent.append(out.metrics.spec.num_draft_tokens)
    assert sent[0] > 0 and sent[1] == 0

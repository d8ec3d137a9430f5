"""Medusa heads: drafting changes nothing (greedy output equals plain decoding; seeded sampling
equals plain sampling, since Medusa drafts are deterministic), trees static and dynamic, and
heads for another model are refused."""

from __future__ import annotations

import pytest
import torch

from onepass import SamplingParams
from onepass.errors import InputError
from onepass.heads.files import llm_target, save_heads
from onepass.heads.medusa import MedusaHeads

PROMPTS = ["The quick brown fox", "def add(a, b):", "1, 2, 3, 4,"]


def write_heads(llm, path, num_heads=3, scale=0.0, seed=0, draft_vocab=None):
    """Heads for `llm` (scale 0: each head repeats the target's next-token guess, which real
    text sometimes accepts; > 0: random residual blocks)."""
    torch.manual_seed(seed)
    vocab = None if draft_vocab is None else torch.arange(draft_vocab)
    heads = MedusaHeads(num_heads, llm.model_config.hidden_size, vocab)
    with torch.no_grad():
        heads.weight.normal_(0, scale)
        heads.bias.normal_(0, scale)
    save_heads(path, "medusa", llm_target(llm), heads.shapes(), heads.tensors(), {})
    return str(path)


def outputs(llm, prompts, params, spec=None):
    results = [llm.generate(p, params, speculative_config=spec)[0] for p in prompts]
    return [r.outputs[0].token_ids for r in results], results


@pytest.mark.parametrize(
    ("tree", "vocab"), [(None, None), ([[0], [1], [0, 0], [0, 1], [0, 0, 0]], 512)]
)
def test_greedy_output_is_plain_greedy_output(tiny_llm, tmp_path, tree, vocab):
    heads = write_heads(tiny_llm, tmp_path, scale=0.5, draft_vocab=vocab)
    spec = {"method": "medusa", "heads": heads}
    if tree is not None:
        spec["speculative_token_tree"] = str([tuple(p) for p in tree])  # vLLM's string form
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain, _ = outputs(tiny_llm, PROMPTS, params)
    fast, results = outputs(tiny_llm, PROMPTS, params, spec)
    assert fast == plain
    assert all(r.metrics.spec.num_drafts > 0 for r in results)


def test_seeded_sampling_equals_plain_sampling(tiny_llm, tmp_path):
    spec = {"method": "medusa", "heads": write_heads(tiny_llm, tmp_path)}
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=40, ignore_eos=True)
    plain, _ = outputs(tiny_llm, PROMPTS, params)
    fast, results = outputs(tiny_llm, PROMPTS, params, spec)
    assert fast == plain
    assert all(r.metrics.spec.num_drafts > 0 for r in results)


def test_heads_for_another_model_are_refused(llm, tiny_llm, tmp_path):
    heads = write_heads(llm, tmp_path)  # trained "for" the default model
    with pytest.raises(InputError) as error:
        tiny_llm.generate("Hi", speculative_config={"method": "medusa", "heads": heads})
    message = str(error.value)
    assert llm.model_name in message and tiny_llm.model_name in message


def test_missing_and_corrupt_heads_are_clear_errors(tiny_llm, tmp_path):
    with pytest.raises(InputError, match="not a head directory"):
        tiny_llm.generate("Hi", speculative_config={"method": "medusa", "heads": str(tmp_path)})
    write_heads(tiny_llm, tmp_path)
    (tmp_path / "heads.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot be read"):
        tiny_llm.generate("Hi", speculative_config={"method": "medusa", "heads": str(tmp_path)})


def test_a_tree_deeper_than_the_heads_is_refused(tiny_llm, tmp_path):
    spec = {
        "method": "medusa",
        "heads": write_heads(tiny_llm, tmp_path, num_heads=1),
        "speculative_token_tree": [[0], [0, 0]],
    }
    with pytest.raises(InputError, match="deeper"):
        tiny_llm.generate("Hi", speculative_config=spec)


@pytest.mark.real_model
def test_greedy_identity_on_the_default_model(llm, tmp_path):
    from lossless import PROMPTS as KINDS
    from lossless import compare_greedy

    spec = {"method": "medusa", "heads": write_heads(llm, tmp_path, draft_vocab=8192)}
    ids = llm.chat_token_ids([{"role": "user", "content": KINDS["math"]}])
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids
    fast = llm.generate({"prompt_token_ids": ids}, params, speculative_config=spec)[0]
    if fast.outputs[0].token_ids != plain:
        result = compare_greedy(llm, ids, spec, 48)
        assert result.near_tie, f"differs at token {result.first_difference}, not a near-tie"
    assert fast.metrics.spec.num_accepted_tokens > 0  # the check has teeth


def test_the_dynamic_tree_takes_the_most_probable_paths_best_first():
    from onepass.draft import DecodeState
    from onepass.drafters.medusa import MedusaDrafter, Options

    heads = MedusaHeads(3, 4)
    drafter = MedusaDrafter(Options(max_nodes=5, top_k=2), heads, None, 5)
    drafter.feature = torch.zeros(1, 4)  # observed; the heads' guesses from it, as given:
    drafter._guess = lambda: None
    drafter.candidates = [[10, 11], [20, 21], [30, 31]]
    drafter.probs = [[0.9, 0.1], [0.5, 0.3], [0.8, 0.2]]
    draft = drafter.propose(DecodeState([1, 2], 1, 64, 64))
    # Paths by probability: (0,) .9, (0,0) .45, (0,0,0) .36, (0,1) .27, (0,1,0) .216; (1,) .1
    assert draft.tokens == [10, 20, 30, 21, 30]
    assert draft.tree.parents == (-1, 0, 1, 0, 3)
    shallow = drafter.propose(DecodeState([1, 2], 1, 64, 2))
    assert max(shallow.tree.depths) <= 2


def test_the_best_paths_are_cut_to_those_that_pay_for_their_rows():
    """With the target's cost curve, only the paths whose probabilities pay for the rows they
    add are sent: the count with the most expected tokens per second of the forward."""
    from onepass.draft import DecodeState
    from onepass.drafters.medusa import MedusaDrafter, Options

    def drafter_with(cost):
        drafter = MedusaDrafter(Options(max_nodes=5, top_k=2), MedusaHeads(3, 4), None, 5, cost)
        drafter.feature = torch.zeros(1, 4)
        drafter._guess = lambda: None
        drafter.candidates = [[10, 11], [20, 21], [30, 31]]
        drafter.probs = [[0.9, 0.1], [0.5, 0.3], [0.8, 0.2]]
        return drafter.propose(DecodeState([1, 2], 1, 64, 64))

    # Paths .9, .45, .36, .27, .216; t(1 + k) = 1 + 0.2 k: (1 + .9 + .45 + .36) / 1.6 is best.
    draft = drafter_with(lambda rows, context=None: 1 + 0.2 * (rows - 1))
    assert draft.tokens == [10, 20, 30] and draft.tree.parents == (-1, 0, 1)
    assert len(drafter_with(lambda rows, context=None: 1.0).tokens) == 5  # rows are free
    assert drafter_with(lambda rows, context=None: float(rows)).tokens == []  # a row, a step

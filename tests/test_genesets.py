"""Gene-set input: GMT / table / dict readers, ontology propagation, matching to the data, thresholds, report, errors."""
import warnings

import numpy as np
import pandas as pd
import pytest

from scdeep_nb.genesets import (GeneSets, GeneSetWarning, as_gene_set_dict, example_gene_sets, example_gmt_path,
                                example_parents, match_gene_sets, propagate_annotations, read_gene_set_table, read_gmt,
                                term_activity, top_terms)

VAR = pd.Index(["CD3D", "CD3E", "LCK", "CD79A", "CD79B", "MS4A1", "LYZ", "S100A8", "GAPDH", "ACTB"])


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def test_gmt_quirks(tmp_path):
    # Excel padding, trailing spaces, blank and comment lines, a duplicated name, a gene listed twice
    (tmp_path / "x.gmt").write_text("# comment\nT\tdesc\tCD3D \tCD3E\t\t\t\n\nB\tNA\tCD79A\tCD79A\tMS4A1\r\nT\td\tLCK\n")
    with pytest.warns(GeneSetWarning, match="more than one line"):
        sets = read_gmt(tmp_path / "x.gmt")
    assert sets == {"T": ["CD3D", "CD3E", "LCK"], "B": ["CD79A", "CD79A", "MS4A1"]}
    with pytest.warns(GeneSetWarning, match="more than once"):
        gs = match_gene_sets(sets, VAR, min_genes=2)
    assert gs.as_dict() == {"T": ["CD3D", "CD3E", "LCK"], "B": ["CD79A", "MS4A1"]}


def test_format_from_content_not_suffix(tmp_path):
    (tmp_path / "sets.txt").write_text("T\tdesc\tCD3D\tCD3E\tLCK\n")  # a GMT with a .txt suffix
    (tmp_path / "pairs.gmt").write_text("term,gene\nT,CD3D\nT,CD3E\nT,LCK\n")  # a table with a .gmt suffix
    assert as_gene_set_dict(tmp_path / "sets.txt") == {"T": ["CD3D", "CD3E", "LCK"]}
    assert as_gene_set_dict(str(tmp_path / "pairs.gmt")) == {"T": ["CD3D", "CD3E", "LCK"]}
    with pytest.raises(ValueError, match="read_gene_set_table"):
        read_gmt(tmp_path / "pairs.gmt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        as_gene_set_dict(tmp_path / "missing.gmt")


def test_table_and_dataframe_inputs():
    df = pd.DataFrame({"gene": ["CD3D", "CD3E", "LCK", "LYZ"], "term": ["T", "T", "T", "M"]})
    assert read_gene_set_table(df, term_col="term", gene_col="gene") == {"T": ["CD3D", "CD3E", "LCK"], "M": ["LYZ"]}
    gs = quiet(match_gene_sets, df[["term", "gene"]], VAR, min_genes=1)
    assert gs.names == ["T", "M"]
    with pytest.raises(TypeError, match="list of genes"):
        match_gene_sets({"T": "CD3D"}, VAR)


def test_propagation_true_path_rule_and_cycles():
    sets = {"tcr": ["CD3D", "CD3E"], "bcr": ["CD79A", "CD79B"], "act": ["LCK"]}
    up = propagate_annotations(sets, pd.DataFrame({"child": ["tcr", "bcr", "act"], "parent": ["act", "act", "immune"]}))
    assert set(up["act"]) == {"LCK", "CD3D", "CD3E", "CD79A", "CD79B"}
    assert set(up["immune"]) == set(up["act"])  # a term known only as a parent gets its descendants' genes
    with pytest.raises(ValueError, match="cycle"):
        propagate_annotations(sets, {"tcr": "act", "act": "immune", "immune": "tcr"})
    with pytest.raises(ValueError, match="own parent"):
        propagate_annotations(sets, {"tcr": "tcr"})
    # deep chains do not hit Python's recursion limit
    chain = {f"t{i}": f"t{i + 1}" for i in range(3000)}
    assert propagate_annotations({"t0": ["CD3D"]}, chain)["t3000"] == ["CD3D"]
    gs = quiet(match_gene_sets, sets, VAR, parents={"tcr": "act", "bcr": "act"}, min_genes=2)
    assert set(gs.as_dict()["act"]) == {"LCK", "CD3D", "CD3E", "CD79A", "CD79B"}


def test_case_folding_is_reported_and_hints_species():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gs = match_gene_sets({"T": ["Cd3d", "Cd3e", "Lck"], "B": ["CD79A", "CD79B", "MS4A1"]}, VAR)
    assert gs.summary["n_case_folded"] == 3 and gs.report.loc["T", "n_case_folded"] == 3
    assert gs.as_dict()["T"] == ["CD3D", "CD3E", "LCK"]  # spelled as in the data
    assert any("ignoring letter case" in str(x.message) and "species" in str(x.message) for x in w)
    with pytest.raises(ValueError, match="species"):
        match_gene_sets({"T": ["Cd3d", "Cd3e", "Lck"]}, VAR, case_sensitive=True)


def test_no_overlap_error_names_the_id_type():
    with pytest.raises(ValueError) as e:
        match_gene_sets({"GO:1": ["ENSG00000167286", "ENSG00000198851", "ENSG00000160654"]}, VAR)
    msg = str(e.value)
    assert "Ensembl gene IDs" in msg and "upper-case symbols" in msg and "CD3D" in msg and "No gene of the 1" in msg


def test_thresholds_apply_to_the_overlap_and_list_removed_sets():
    big = {"big_raw_small_overlap": ["CD3D", "CD3E"] + [f"X{i}" for i in range(200)], "ok": ["LYZ", "S100A8", "GAPDH"],
           "none": ["PPBP"]}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gs = match_gene_sets(big, VAR, min_genes=3, max_genes=10)
    assert gs.names == ["ok"]
    assert gs.report.loc["big_raw_small_overlap", "status"] == "below min_genes=3"
    assert gs.report.loc["big_raw_small_overlap", "n_genes_input"] == 202
    assert gs.report.loc["none", "status"] == "no gene in the data"
    msgs = " ".join(str(x.message) for x in w)
    assert "1 of 3 gene sets have no gene in the data" in msgs and "size thresholds" in msgs
    with pytest.raises(ValueError, match="is below min_genes=3"):
        match_gene_sets({"a": ["CD3D", "CD3E", "LCK"]}, VAR, min_genes=3, max_genes=2)
    with pytest.raises(ValueError, match="No gene set is left.*max 2"):
        quiet(match_gene_sets, {"a": ["CD3D", "CD3E"], "b": ["LYZ"]}, VAR, min_genes=3)


def test_identical_masks_are_merged_and_mask_is_right():
    with pytest.warns(GeneSetWarning, match="merged"):
        gs = match_gene_sets({"B1": ["CD79A", "CD79B", "MS4A1"], "B2": ["MS4A1", "CD79A", "CD79B", "NOT_IN_DATA"],
                              "T": ["CD3D", "CD3E", "LCK"]}, VAR)
    assert gs.names == ["B1|B2", "T"]
    assert gs.report.loc["B2", "status"] == "merged into B1|B2"
    kept = quiet(match_gene_sets, {"B1": ["CD79A", "CD79B", "MS4A1"], "B2": ["CD79A", "CD79B", "MS4A1"]}, VAR,
                 merge_identical=False)
    assert kept.names == ["B1", "B2"]
    M = gs.mask()
    assert M.shape == (len(VAR), 2) and M.dtype == np.float32
    assert list(VAR[M[:, 1] == 1]) == ["CD3D", "CD3E", "LCK"]
    # the mask for another gene order follows the names
    assert (gs.mask(VAR[::-1]) == M[::-1]).all()
    # matching a matched result again changes nothing (what a saved model relies on)
    assert match_gene_sets(gs.as_dict(), VAR).as_dict() == gs.as_dict()


def test_duplicated_data_genes_warn_and_connect_every_copy():
    var = pd.Index(["CD3D", "CD3E", "LCK", "CD3D"])
    with pytest.warns(GeneSetWarning, match="duplicated"):
        gs = match_gene_sets({"T": ["CD3D", "CD3E", "LCK"]}, var)
    assert gs.mask()[:, 0].tolist() == [1, 1, 1, 1]


def test_example_gene_sets_ship_and_match_pbmc68k():
    from scdeep_nb.datasets import pbmc68k
    path = example_gmt_path()
    assert path.exists() and path.suffix == ".gmt"
    sets = example_gene_sets()
    assert len(sets) == 35 and all(len(g) >= 4 for g in sets.values())
    assert {"CD3D", "CD3E", "CD3G", "CD247"} <= set(sets["T_CELL_RECEPTOR_COMPLEX"])
    pbmc = pbmc68k()
    gs = quiet(match_gene_sets, path, pbmc.var_names, parents=example_parents())
    assert isinstance(gs, GeneSets) and len(gs) >= 30 and gs.summary["n_case_folded"] == 0
    assert gs.summary["n_data_genes_in_sets"] > 200
    assert {"MEGAKARYOCYTE_PLATELET", "ERYTHROID_HEMOGLOBIN"} <= set(gs.report.index[gs.report.n_genes_matched == 0])
    assert set(gs.as_dict()["LYMPHOCYTE_ACTIVATION"]) >= set(gs.as_dict()["T_CELL_RECEPTOR_COMPLEX"])


def test_term_activity_ranks_the_active_node():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(90, 4)); groups = np.repeat(["a", "b", "c"], 30)
    A[groups == "c", 2] += 2.0
    act = term_activity(pd.DataFrame(A, columns=list("wxyz")), groups)
    assert act.shape == (4, 3) and act["c"].idxmax() == "y"
    assert top_terms(act, 1).loc["c", 1] == "y"
    with pytest.raises(ValueError, match="one group per cell"):
        term_activity(A, groups[:5])

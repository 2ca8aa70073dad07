"""`sinkstream eval anomaly` on small synthetic fixtures (no internet): HDFS rendering, the split, the simple
detectors of evaluate.py, rank metrics, the reference profile and the command's detectors-only path."""

from __future__ import annotations

import json
import random

import pytest

from pipeline.cli.main import main
from pipeline.evaluation import hdfs
from pipeline.evaluation.anomaly_eval import boundary_metrics, documents
from pipeline.evaluation.detectors import (
    ecvc_scores,
    event_scores,
    length_scores,
    ngram_scores,
    rank_metrics,
    session_detectors,
)

TEMPLATES = ["<*>Receiving block<*>src:<*>dest:<*>", "<*>PacketResponder <*> for block <*> terminating<*>",
             "<*>Deleting block<*>file<*>", "<*>Exception in receiveBlock for block<*>"]


@pytest.fixture
def data_dir(tmp_path):
    """A copy laid out like ait-aecid's repository: normal sessions of events 1-3, abnormal ones with event 4
    or with an unusual count of event 2."""
    rng = random.Random(0)
    (tmp_path / "hdfs_logdeep").mkdir()
    (tmp_path / "templates").mkdir()
    normal = [[1, 1, 1] + [2] * 3 + [3] * rng.choice([0, 3]) for _ in range(60)]
    abnormal = [[1, 1, 1, 4, 2, 2] if i % 2 else [1, 1, 1] + [2] * 9 for i in range(20)]
    (tmp_path / "hdfs_logdeep" / "hdfs_train").write_text("".join(" ".join(map(str, s)) + " \n" for s in normal))
    (tmp_path / "hdfs_logdeep" / "hdfs_test_abnormal").write_text("".join(" ".join(map(str, s)) + "\n"
                                                                          for s in abnormal))
    (tmp_path / "templates" / "HDFS_templates.csv").write_text("\n".join(TEMPLATES) + "\n")
    return tmp_path


def test_rank_metrics_exact():
    m = rank_metrics([0.1, 0.4, 0.35, 0.8], [False, False, True, True], flags=[False, True, False, True])
    assert m["auc"] == pytest.approx(0.75) and m["ap"] == pytest.approx(0.8333333)
    assert m["best_f1"] == pytest.approx(0.8) and m["f1_at_flags"] == pytest.approx(0.5) and m["flagged"] == 2
    assert rank_metrics([None, 1.0], [False, True])["auc"] == 1.0  # None ranks last
    with pytest.raises(ValueError, match="both classes"):
        rank_metrics([1.0, 2.0], [True, True])


def test_detectors_as_in_evaluate_py():
    ref = [[1, 2, 2], [1, 2, 3]]
    test = [[1, 2, 2], [1, 2, 4], [1, 2, 2, 2, 2, 2], [2, 1]]
    assert event_scores(ref, test) == [0.0, 1.0, 0.0, 0.0]
    assert length_scores(ref, test) == [0.0, 0.0, 1.0, 1.0]
    # [1,2,4] vs [1,2,3]: |3| + |4| unknown over max-sum 1+1+1+1 -> 2/4; vs [1,2,2]: (1 + 1) / (1+2+1) = 0.5
    assert ecvc_scores(ref, test) == pytest.approx([0.0, 0.5, 0.5, 1 / 3])
    gram = ngram_scores(ref, test, 2)
    assert gram[0] == 0.0 and gram[2] == 0.0 and gram[1] > 0 and gram[3] == 1.0  # shortest novel one scores 1


def test_render_interleave_and_split_are_deterministic(data_dir):
    files = hdfs.fetch_hdfs(data_dir, data_dir)
    train, abnormal = hdfs.read_sessions(files["train"]), hdfs.read_sessions(files["abnormal"])
    assert len(train) == 60 and train[0][:3] == [1, 1, 1]

    def build():
        r = hdfs.Renderer(hdfs.read_templates(files["templates"]), seed=0)
        sp = hdfs.split(train, abnormal, r, reference=20, normal=30, anomalous=10, seed=0)
        return sp, hdfs.interleave(sp.test, r, concurrent=5, seed=1)

    (sp, pairs), (sp2, pairs2) = build(), build()
    assert pairs == pairs2 and [s.block for s in sp.test] == [s.block for s in sp2.test]
    assert len(sp.reference) == 20 and len(sp.test) == 40 and sum(s.abnormal for s in sp.test) == 10
    assert len(pairs) == sum(len(s.events) for s in sp.test)
    # each block's lines keep its events' order and carry its block id; blocks do interleave
    by_block: dict[str, list[str]] = {}
    for block, line in pairs:
        by_block.setdefault(block, []).append(line)
        assert "<*>" not in line and " INFO dfs." in line
    for s in sp.test:
        assert len(by_block[s.block]) == len(s.events)
        assert all(s.block in line for line in by_block[s.block])
    switches = sum(1 for a, b in zip(pairs, pairs[1:]) if a[0] != b[0])
    assert switches > len(sp.test)


def test_real_template_file_is_rendered_with_plausible_values():
    templates = ["<*>Adding an already existing block<*>", "<*>Verification succeeded for<*>"]
    templates += [f"<*>t{i}<*>" for i in range(3, 22)] + ["<*>BLOCK* NameSystem<*>allocateBlock:<*>"]
    templates += [f"<*>t{i}<*>" for i in range(23, 31)]
    templates += ["<*>DataXceiver<*>DataXceiver<*>Block <*> is valid, and cannot be written to."]
    templates += ["<*>t32<*>", "<*>t33<*>"]
    r = hdfs.Renderer(templates, seed=0)
    assert r.fill  # recognised as the ait-aecid file
    line = r.line(22, "blk_1")
    assert line.endswith(". blk_1")
    assert "INFO dfs.FSNamesystem: BLOCK* NameSystem.allocateBlock: /user/root/rand" in line
    assert r.line(2, "blk_7").endswith("INFO dfs.DataBlockScanner: Verification succeeded for blk_7")


def test_documents_and_boundary_metrics():
    texts = {"a.txt": "\n".join(f"a{i}" for i in range(100)), "b.txt": "\n".join(f"b{i}" for i in range(100))}
    docs = documents(texts, docs=4, lines_per_doc=5)
    assert [d for _, d in docs] == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert docs[0][0] == "a0" and docs[5][0] == "b0" and docs[10][0] == "a15"
    lines = [{"score": 5.0 if i % 5 == 0 else 0.0, "mean_nll": 1.0, "z": None} for i in range(len(docs))]
    m = boundary_metrics(lines, [d for _, d in docs], first=1)
    assert m["combined score"]["auc"] == 1.0 and m["combined score"]["positives"] == 3
    assert m["LM surprisal (mean NLL)"]["auc"] == 0.5 and "z" not in m


def test_session_detectors_on_the_fixture_and_the_command(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval", "anomaly", "--parts", "hdfs", "--detectors-only", "--data-dir", str(data_dir),
                 "--sessions", "30,20", "--reference-sessions", "20", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "eval_anomaly.json").read_text())["hdfs"]
    assert report["test_sessions"] == 50 and report["test_abnormal"] == 20
    det = report["detectors"]
    assert det["Event"]["tp"] == 10 and det["Event"]["flagged"] == 10  # the sessions with event 4
    assert det["ECVC"]["auc"] == 1.0 and det["Event+Length+ECVC"]["best_f1"] == 1.0
    assert "| ECVC (event ids)" in capsys.readouterr().out
    assert (out / "eval_anomaly.png").read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "again"
    assert main(["eval", "anomaly", "--from-report", str(out / "eval_anomaly.json"), "--out", str(again)]) == 0
    assert (again / "eval_anomaly.md").read_text() == (out / "eval_anomaly.md").read_text()


def test_missing_local_copy_and_bad_sizes_are_one_line_errors(tmp_path, capsys):
    code = main(["eval", "anomaly", "--parts", "hdfs", "--detectors-only", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("sinkstream: error: --data-dir: expected the ait-aecid files")
    assert main(["eval", "anomaly", "--sessions", "10", "--out", str(tmp_path / "o")]) == 2
    assert "expected NORMAL,ABNORMAL" in capsys.readouterr().err


def test_session_detectors_need_both_classes():
    with pytest.raises(ValueError):
        session_detectors([[1]], [[1], [2]], [False, False])


def test_hdfs_and_lines_through_the_service_with_a_tiny_model(data_dir, text_lm):
    """The service path end to end: every test key's lines come back scored, with template ids and a verdict;
    a key-level report per ranker; labels never reach the records (keys are block ids, values log lines)."""
    from pipeline.evaluation.anomaly_eval import bgl_metrics, bgl_pass, hdfs_eval
    from pipeline.settings import load_settings

    base = load_settings(None, cache={"sinks": 4, "window": 64, "chunk": 32}, service={"max_resident_streams": 8})
    files = hdfs.fetch_hdfs(data_dir, data_dir)
    r = hdfs.Renderer(hdfs.read_templates(files["templates"]), seed=0)
    sp = hdfs.split(hdfs.read_sessions(files["train"]), hdfs.read_sessions(files["abnormal"]), r,
                    reference=20, normal=12, anomalous=6, seed=0)
    report = hdfs_eval(text_lm, base, sp, r, concurrent=4)
    assert report["keys_seen"] == 18 and report["test_lines"] == sum(len(s.events) for s in sp.test)
    service = report["service"]
    # event 4 is in no reference session: the service's not-in-reference count finds exactly those keys
    with_4 = sum(4 in s.events for s in sp.test)
    assert with_4 > 0 and service["verdict not_in_reference"]["tp"] == with_4
    assert service["verdict not_in_reference"]["flagged"] == with_4
    assert service["verdict profile_distance"]["auc"] == 1.0
    assert service["verdict key_score (profile + not-in-reference + max score)"]["auc"] == 1.0
    # the same verdicts without the model (the service's StreamJudge per key, full size in the real run)
    assert report["templates_only"]["verdict profile_distance"]["auc"] == 1.0
    assert report["templates_only"]["verdict not_in_reference"]["tp"] == with_4

    lines = [f"node{i % 3} RAS KERNEL INFO generating core.{i}" for i in range(60)]
    test = lines[:20] + ["node1 RAS KERNEL FATAL data TLB error interrupt"] + lines[20:39]
    got, seconds, tokens = bgl_pass(text_lm, base, lines, test, lines_per_record=7)
    assert len(got) == 40 and tokens > 0 and seconds > 0
    assert got[20]["template"]["seen_reference"] == 0 and got[19]["template"]["seen_reference"] > 0
    rows = bgl_metrics(test, [i == 20 for i in range(40)], {"p": got})
    by = {(r["ranker"], r["subset"]): r for r in rows}
    assert by[("keyword FATAL", "all")]["auc"] == 1.0 and by[("new template (not in reference)", "all")]["auc"] == 1.0


def test_bgl_without_the_model_is_the_services_judge_on_the_same_lines():
    """`bgl_templates_only`: the lines' scores are the novelty and severity terms of the service's formula."""
    from pipeline.evaluation.anomaly_eval import bgl_metrics, bgl_templates_only
    from pipeline.service.verdict import combined_score
    from pipeline.settings import load_settings

    reference = [f"node{i % 3} RAS KERNEL INFO generating core.{i}" for i in range(30)]
    test = reference[:5] + ["node1 RAS KERNEL FATAL data TLB error interrupt", "node2 RAS APP ERROR ciod: failed"]
    got = bgl_templates_only(None, reference, test)
    assert [x["severity"] for x in got] == ["INFO"] * 5 + ["FATAL", "ERROR"]
    assert all(x["mean_nll"] is None and x["z"] is None for x in got)
    sc = load_settings(None).score
    fatal = got[5]
    assert fatal["template"]["seen_reference"] == 0 and fatal["score"] == combined_score(
        sc, None, new_stream=True, new_partition=True, new_reference=True, seen=0, lines=30 + 5, severity="FATAL")
    rows = bgl_metrics(test, [False] * 5 + [True, False], {"no LM": got})
    by = {(r["ranker"], r["subset"]): r for r in rows}
    assert by[("combined score", "all")]["auc"] == 1.0  # FATAL (8) above ERROR (4) above the INFO lines
    assert by[("declared severity (default levels)", "all")]["auc"] == 1.0

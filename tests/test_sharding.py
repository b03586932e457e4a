"""Sharded answering (geochange/sharding.py): the dealing of items to processes, two processes under torchrun whose
answers all reach the one writer, once each; and the sharded evaluations (video models, DeltaVLM's batch mode) equal
to one process's, record for record."""
from __future__ import annotations

import json
import shutil
import textwrap

import pytest
from conftest import REPO, torchrun

from geochange.sharding import Shard, answer_in_shards, share_of, steps_needed


def test_items_are_dealt_longest_first_so_every_process_gets_as_many_long_ones():
    items = [f"item{i}" * (i % 7 + 1) for i in range(11)]
    shares = [share_of(items, Shard(rank, 3), cost=len) for rank in range(3)]
    assert sorted(item for share in shares for item in share) == sorted(items)  # each exactly once
    assert [len(share) for share in shares] == [4, 4, 3]
    longest = sorted(items, key=len, reverse=True)
    assert [share[0] for share in shares] == longest[:3]  # the three longest go to three processes
    assert all(len(a) >= len(b) for share in shares for a, b in zip(share, share[1:]))
    assert share_of(items, Shard(0, 1)) == items  # one process: everything, in order
    # rank 0's share is the largest: the number of steps every process takes
    for total in range(0, 12):
        for world in (1, 2, 3, 4):
            largest = max(len(share_of(list(range(total)), Shard(r, world))) for r in range(world))
            assert steps_needed(total, 2, Shard(0, world)) == -(-largest // 2)


def test_each_process_answers_on_its_own_gpu(monkeypatch):
    import torch

    from geochange.sharding import shard_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert shard_device(Shard(3, 8), "auto") == torch.device("cuda", 3)  # under torchrun: its local GPU
    assert shard_device(Shard(3, 8), "cpu") == torch.device("cpu")  # a device named is a device used
    assert shard_device(Shard(), "auto") == torch.device("cuda")  # one process: the first GPU, as before
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert shard_device(Shard(3, 8), "auto") == torch.device("cpu")


def test_in_step_every_process_takes_part_in_every_step_and_spare_answers_are_dropped(monkeypatch):
    import geochange.sharding as sharding

    monkeypatch.setattr(sharding, "gather_at_main", lambda shard, records: None)  # rank 1's view of the gather
    calls, written = [], []

    def answer(batch):
        calls.append(list(batch))
        return [{"id": i} for i in batch]

    # rank 1 of 2 holds 2 of 5 items: its third step answers the spare first item, which is never written
    answer_in_shards(Shard(1, 2), list(range(5)), 1, answer, written.extend, in_step=True)
    assert calls == [[1], [3], [0]] and written == []  # only rank 0 writes
    calls.clear()
    answer_in_shards(Shard(1, 2), list(range(5)), 1, answer, written.extend)
    assert calls == [[1], [3]]  # without in_step a process with nothing left only joins the gather


def test_what_rank_0_decides_reaches_every_process_and_its_one_line_error_stops_them_all(monkeypatch, capfd):
    import geochange.sharding as sharding
    from geochange.errors import UserError
    from geochange.sharding import decided_by_main

    sent = []
    monkeypatch.setattr(sharding, "from_main", lambda shard, value: sent.append(value) or value)  # rank 0's broadcast

    def bad():
        raise UserError("the results file x is being written by another process")

    assert decided_by_main(Shard(0, 2), lambda: [1, 2]) == [1, 2] and sent == [("value", [1, 2])]
    with pytest.raises(SystemExit) as stopped:  # rank 0: its one line, printed before the others can stop
        decided_by_main(Shard(0, 2), bad)
    assert stopped.value.code == 2 and sent[-1] == ("error", "the results file x is being written by another process")
    # the real stderr (the error handler writes there: under torchrun sys.stderr is a buffer), so capfd
    assert capfd.readouterr().err == "error: the results file x is being written by another process\n"
    monkeypatch.setattr(sharding, "from_main", lambda shard, value: sent[-1])  # rank 1 receives it
    with pytest.raises(SystemExit) as stopped:  # the others: quietly, status 2, not waiting at a collective
        decided_by_main(Shard(1, 2), lambda: pytest.fail("only rank 0 decides"))
    assert stopped.value.code == 2 and capfd.readouterr().err == ""
    with pytest.raises(UserError):  # one process: the error as it is (the script's handler prints it)
        decided_by_main(Shard(), bad)


def test_one_process_answers_everything_and_writes_each_batch():
    written = []
    answer_in_shards(Shard(), list(range(7)), 3, lambda batch: [{"id": i, "x": i * i} for i in batch], written.append)
    assert [[r["id"] for r in batch] for batch in written] == [[0, 1, 2], [3, 4, 5], [6]]


SCRIPT = """
import json, os, sys
from geochange.engines import group_timeout_minutes
from geochange.sharding import answer_in_shards, from_main, start_shards, stop_shards

shard = start_shards(timeout_minutes=7)  # a script's DIST_TIMEOUT_MINUTES
items = from_main(shard, list(range(int(sys.argv[2]))) if shard.main else None)  # only rank 0 knows what is left
out = sys.argv[1]

def answer(batch):
    return [{"id": i, "answer": i * 10, "rank": shard.rank, "timeout": group_timeout_minutes()} for i in batch]

def write(records):
    with open(out, "a") as handle:
        handle.write(json.dumps(records) + "\\n")

answer_in_shards(shard, items, 2, answer, write, cost=lambda i: i % 3)
stop_shards(shard)
"""


@pytest.mark.slow
def test_two_processes_answer_their_shares_and_rank_0_writes_them_all_once(tmp_path, free_port):
    script = tmp_path / "answer.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = tmp_path / "answers.jsonl"
    run = torchrun(free_port, str(script), str(out), "7", env={"PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    batches = [json.loads(line) for line in out.read_text().splitlines()]
    # 7 items, 2 processes, batches of 2: ranks answer 4 and 3 items, in 2 steps, each step written once
    assert len(batches) == 2
    records = [r for batch in batches for r in batch]
    assert sorted(r["id"] for r in records) == list(range(7))
    assert all(r["answer"] == r["id"] * 10 for r in records)
    assert {r["rank"] for r in records} == {0, 1}
    expected = {rank: sorted(share_of(list(range(7)), Shard(rank, 2), cost=lambda i: i % 3)) for rank in (0, 1)}
    assert {rank: sorted(r["id"] for r in records if r["rank"] == rank) for rank in (0, 1)} == expected
    assert {r["timeout"] for r in records} == {7}  # the group's own timeout, read back, is the setting


RUN_SCRIPTS = """
import json, runpy, sys
import torch.distributed as dist

# several scripts in one launch (one interpreter start), in one process group that outlives each of them, as the
# training's outlives the evaluation after it
dist.init_process_group("gloo")
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
"""


def by_id(path) -> dict:
    return {record["id"]: record for record in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_repo")  # its one-process evaluations are the reference
def test_sharded_evaluations_equal_one_process_record_for_record_and_a_killed_run_resumes(tiny_repo, tmp_path,
                                                                                         free_port):
    from geochange.sample.data import SAMPLE_CHANGECHAT_CAPTIONS

    reference = tiny_repo / "results"
    video = ["videollava_test.py", "MODEL_ID=tiny", "MODEL_PATH=base", f"VAL_ANNOTATIONS={tiny_repo / 'val.json'}",
             "MAX_NEW_TOKENS=8", "BATCH_SIZE=1"]
    # A sharded run killed mid-way left one record and part of the next (a killed writer's cut line): the rerun
    # answers the other three, two on one process and one on the other (which takes its last step with nothing).
    killed = tmp_path / "video"
    killed.mkdir()
    for suffix in (".jsonl", ".settings.json"):
        shutil.copy(reference / f"videollava-tiny_base{suffix}", killed)
    lines = (killed / "videollava-tiny_base.jsonl").read_text().splitlines(keepends=True)
    (killed / "videollava-tiny_base.jsonl").write_text(lines[0] + lines[1][:25])
    runs = [[*video, f"RESULTS_DIR={killed}"],
            ["deltavlm_predict.py", "CHECKPOINT=tiny", f"TEST_ANNOTATIONS={SAMPLE_CHANGECHAT_CAPTIONS}", "LIMIT=4",
             "NUM_BEAMS=1", "MAX_NEW_TOKENS=8", "BATCH_SIZE=1", f"RESULTS_DIR={tmp_path / 'deltavlm'}"]]
    script = tmp_path / "run_scripts.py"
    script.write_text(RUN_SCRIPTS)
    run = torchrun(free_port, str(script), json.dumps(runs), env={"PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    # each process answered on its own, and rank 0 scored each file once
    assert "process 1 of 2: generating on cpu" in out and "process 1 of 2: loaded on cpu" in out
    assert "evaluating videollava-tiny_base: 3 of 4 samples to go on 2 processes" in out  # the killed run's rest
    assert "dropped an incomplete last line" in run.stderr
    for folder, name in (("video", "videollava-tiny_base"), ("deltavlm", "deltavlm-tiny_sample_changechat_captions")):
        sharded = tmp_path / folder / f"{name}.jsonl"
        assert out.count(f"metrics: {sharded.with_suffix('.metrics.json')}") == 1
        assert by_id(sharded) == by_id(reference / f"{name}.jsonl"), folder  # record for record, once each
        ours, theirs = (json.loads((path / f"{name}.metrics.json").read_text()) for path in (sharded.parent, reference))
        assert ours["processes"] == 2 and ours["num_samples"] == theirs["num_samples"] == 4
        assert ours["metrics"] == pytest.approx(theirs["metrics"], abs=1e-9)

"""Sharded answering (geochange/sharding.py): the dealing of items to processes, and two processes under torchrun
whose answers all reach the one writer, once each."""
from __future__ import annotations

import json
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

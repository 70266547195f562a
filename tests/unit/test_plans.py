"""Step plans as deltas (engine/distributed/plans.py): a worker's mirror must hold, for every
sequence of every step, exactly what rank 0's sequence holds as far as the step reads it — through
new requests, growth, preemption and re-admission on other pages, id reuse, idle drops. The oracle
is rank 0's own ``Sequence`` objects; plans go through pickle, as over the pipe."""

from __future__ import annotations

import pickle
import random

from engine.distributed.plans import PlanDecoder, PlanEncoder
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence


def what_a_step_reads(seq: Sequence, n: int) -> tuple:
    start = seq.num_computed
    window = seq.token_ids[start : start + n]
    return (seq.request_id, seq.num_prompt, seq.num_tokens, start, window, list(seq.pages),
            seq.num_inflight, seq.inflight_row, seq.params, seq.seed, seq.num_output)  # fmt: skip


def check(enc: PlanEncoder, dec: PlanDecoder, batch: ScheduledBatch) -> int:
    data = pickle.dumps(enc.encode(batch))
    got = dec.decode(pickle.loads(data))
    assert got.extend_lens == batch.extend_lens and got.is_decode == batch.is_decode
    for mine, theirs, n in zip(got.seqs, batch.seqs, batch.extend_lens, strict=True):
        assert what_a_step_reads(mine, n) == what_a_step_reads(theirs, n)
    assert set(dec.mirror) == {rid for rid in enc._sent}, "mirror and encoder agree on who is mirrored"
    return len(data)


def test_random_schedules_keep_the_mirror_exact():
    rng = random.Random(0)
    enc, dec = PlanEncoder(idle_steps=20), PlanDecoder()
    live: list[Sequence] = []
    finished: list[Sequence] = []
    next_page, next_id = 1, 0
    for _ in range(400):
        if not live or rng.random() < 0.15:  # a new request
            prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 40))]
            params = SamplingParams(temperature=rng.choice([0.0, 0.7]), seed=rng.randrange(9))
            old = finished.pop(rng.randrange(len(finished))) if finished and rng.random() < 0.3 else None
            seq = Sequence(
                f"r{next_id}" if old is None else old.request_id, prompt, params, rng.randrange(99), 200
            )
            next_id += 1
            if old is not None and old.pages:  # its finished namesake's first pages: a prefix hit
                k = rng.choice([len(old.pages), rng.randint(1, len(old.pages))])
                seq.pages, seq.num_computed = old.pages[:k], min(4 * k, seq.num_tokens - 1)
            live.append(seq)
        if live and rng.random() < 0.1:  # finished: leaves rank 0 (the mirror drops it when idle)
            finished.append(live.pop(rng.randrange(len(live))))
        if live and rng.random() < 0.1:  # preempted, then re-admitted on other pages
            seq = rng.choice(live)
            seq.pages, seq.num_computed = [], 0
        step = [s for s in live if rng.random() < 0.8]  # some sit out a step
        lens = []
        for seq in step:
            n = (
                max(1, min(rng.randint(1, 12), seq.num_tokens - seq.num_computed))
                if seq.num_computed < seq.num_tokens
                else 1
            )
            while len(seq.pages) * 4 < seq.num_computed + n:
                seq.pages.append(next_page)
                next_page += 1
            seq.num_inflight, seq.inflight_row = rng.choice([(0, -1), (1, rng.randrange(8))])
            lens.append(n)
        if step:
            check(enc, dec, ScheduledBatch(step, lens, is_decode=all(n == 1 for n in lens)))
        for seq, n in zip(step, lens, strict=True):
            seq.num_computed += n
            if seq.num_computed >= seq.num_tokens:
                seq.token_ids.append(rng.randrange(1000))


def test_steady_decode_sends_deltas_not_sequences():
    seqs = []
    for i in range(64):
        seq = Sequence(f"r{i}", list(range(900)), SamplingParams(), 0, 4096)
        seq.pages = list(range(1 + i * 60, 1 + (i + 1) * 60))
        seq.num_computed = 899
        seqs.append(seq)
    enc, dec = PlanEncoder(), PlanDecoder()
    batch = ScheduledBatch(seqs, [1] * 64, is_decode=True)
    first = check(enc, dec, batch)
    for seq in seqs:
        seq.num_computed += 1
        seq.token_ids.append(3)
    later = check(enc, dec, batch)
    assert later * 5 < first, f"a decode step's plan is {later} bytes, the first {first}"

"""Readable pure-Python twin of ``block_sgl._fastsim``: THE SPECIFICATION of fastsim.

Given one SGLang instance's state, a step-latency model and a candidate request, replay SGLang
0.5.23's own scheduling (non-overlapped steps) and return when the candidate gets its first token
(TTFT), when it finishes (E2E) and when its first prefill step starts (queueing delay), in
seconds from the candidate's arrival. ``block_sgl/_fastsim.pyx`` implements the same arithmetic in the same
order; ``tests/differential/test_fastsim_parity.py`` holds the two together. Change both or none.

Citations (``S/`` = ``sglang/srt/``, sglang 0.5.23):

* step loop: ``S/managers/scheduler.py`` ``Scheduler.get_next_batch_to_run`` (prefill first,
  else decode; merge of the last extend batch; ``batch_is_full`` resets when a request leaves);
  ``Scheduler._get_new_batch_prefill_raw`` (skip when ``batch_is_full`` or the queue is empty and
  no chunked request; the chunked request goes first; FCFS walk that stops at the first request
  that does not fit; ``get_num_allocatable_reqs`` = ``max_running_requests`` - running);
  ``Scheduler.update_running_batch`` (``check_decode_mem`` -> ``retract_decode`` else
  ``new_token_ratio`` decay).
* admission: ``S/managers/schedule_policy.py`` ``PrefillAdder`` (``__init__``: reserve
  ``min(max_new - out, CLIP_MAX_NEW_TOKENS) * new_token_ratio`` per running request, x1 with
  ``ignore_eos``; ``add_chunked_req``; ``add_one_req`` + ``_select_prefill_admission``;
  ``_update_prefill_budget``; ``budget_state``) and ``S/mem_cache/prefill_budget.py``
  ``PrefillBudget`` (``remaining_total``/``remaining_current``, ``check_prefill``: ``total <
  remaining_total``, ``reserve``: paged extend + one page, ``available_chunk_tokens``).
* new_token_ratio: ``S/managers/scheduler_components/new_token_ratio_tracker.py`` (init 0.7,
  min = 0.14 x init, decay (init - min) / 600 per decode step, after a retraction
  ``min(1, (sum out + 20 n) / (sum max_new + 1))``); constants in ``S/environ.py``.
* retraction: ``S/managers/schedule_batch.py`` ``ScheduleBatch.retract_decode`` /
  ``_get_decode_retraction_order`` (retract fewest outputs, then longest input, first; keep at
  least one; retracted requests go to the END of the waiting queue, their KV freed).
* LPM: ``SchedulePolicy.calc_priority`` / ``_sort_by_longest_prefix`` (stable sort by matched
  prefix, only while the queue holds <= 128 requests: ``WAITING_QUEUE_PREFIX_MATCH_MAX``).

Approximations (see ``benchmarks/micro/README_fastsim.md``): KV usage is tracked in tokens
(free + evictable as one pool; the adder's page rounding is reproduced, decode allocates one
token per request per step); matched prefixes are fixed (no prefix growth from requests prefilled
meanwhile, no in-batch prefix dedup, prefix pins not charged); ``new_token_ratio`` after ``n``
decays is ``max(r - n * decay, min)`` (not n rounded subtractions); no overlap scheduling, no
mixed chunk, no grammar/LoRA/HiCache/priority paths.

Data layout (int64 everywhere; shared with the compiled kernel):

* ``running``, ``waiting``, ``pending``: arrays of shape ``(6, n)``, rows ``FIELDS``.
  ``pending`` = requests dispatched to the instance but not yet in its snapshot: they join the
  waiting queue after ``waiting``, in order, as they arrive (below), and then the candidate.
* Time runs from the snapshot: SGLang's hooks take it at the end of a step
  (``process_batch_result``), i.e. at a scheduling-round boundary, so the simulation starts
  there with the snapshot's running batch and waiting queue. Everything else ARRIVES: the
  pending requests at ``pending_t`` (optional float64 ``(p,)``, seconds after the snapshot,
  non-decreasing; default 0, i.e. in transit when the snapshot was taken; a time after the
  candidate's counts as the candidate's: they were dispatched before it), the candidate at
  ``elapsed_s`` (``fscal``), and the ``future`` requests (optional, EXPECTED after the
  candidate, ``(6, m)`` like the others, with ``future_t`` float64 ``(m,)``: seconds after the
  candidate's arrival, non-decreasing). An arrival joins the end of the waiting queue at the
  first scheduling round that starts at or after its time (SGLang receives requests at the
  top of each event-loop iteration: ``Scheduler.event_loop_normal`` -> ``recv_requests``); a
  closed-form decode jump stops at the step during which the next one arrives. So a snapshot
  taken just before a long prefill of requests it does not show yet is replayed from its own
  time, with that prefill, rather than from the candidate's arrival as if the instance had
  been free meanwhile. Results (TTFT, E2E, queueing delay) count from the candidate's arrival.
  Future requests cannot change the candidate's place in an FCFS queue, but their prefill steps
  and their share of the decode batch lengthen its E2E — what a prediction made at arrival
  otherwise misses under load (``benchmarks/accuracy``).
* ``iscal``: int64 ``(N_ISCAL,)``, indices ``I_*``; ``fscal``: float64 ``(N_FSCAL,)``, ``F_*``;
  ``coeffs``: the 5 ``StepModel`` coefficients; ``cand``: int64 ``(N_CAND,)``, ``C_*``.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

FIELDS = ("input_len", "prefix_len", "output_len", "max_new_tokens", "ignore_eos",
          "pred_output_len")
N_FIELDS = 6
R_INPUT, R_PREFIX, R_OUTPUT, R_MAX_NEW, R_IGNORE_EOS, R_PRED = range(N_FIELDS)

ISCAL_NAMES = ("page_size", "max_total_num_tokens", "free_kv_tokens", "evictable_tokens",
               "max_running_requests", "chunked_prefill_size", "max_prefill_tokens",
               "schedule_policy", "chunked_idx", "chunked_prefilled", "batch_is_full",
               "clip_max_new_tokens", "retract_decode_steps")
N_ISCAL = len(ISCAL_NAMES)
(I_PAGE, I_MAX_TOTAL, I_FREE, I_EVICTABLE, I_MAX_RUNNING, I_CHUNK, I_MAX_PREFILL, I_POLICY,
 I_CHUNKED_IDX, I_CHUNKED_DONE, I_BATCH_FULL, I_CLIP, I_RETRACT_STEPS) = range(N_ISCAL)

FSCAL_NAMES = ("new_token_ratio", "init_new_token_ratio", "min_new_token_ratio",
               "new_token_ratio_decay", "elapsed_s")
N_FSCAL = len(FSCAL_NAMES)
F_RATIO, F_INIT_RATIO, F_MIN_RATIO, F_DECAY, F_ELAPSED = range(N_FSCAL)

CAND_NAMES = ("input_len", "prefix_len", "pred_output_len", "max_new_tokens", "ignore_eos")
N_CAND = len(CAND_NAMES)
C_INPUT, C_PREFIX, C_PRED, C_MAX_NEW, C_IGNORE_EOS = range(N_CAND)

COEFF_NAMES = ("const_s", "per_token_s", "knee_tokens", "per_prefill_pair_s",
               "per_decode_context_token_s")
N_COEFFS = 5

POLICY_FCFS, POLICY_LPM = 0, 1
LPM_MAX_QUEUE = 128  # schedule_policy.WAITING_QUEUE_PREFIX_MATCH_MAX

# PrefillAdder.budget_state results
CONTINUE, NO_TOKEN, OTHER = 0, 1, 2

INF = math.inf


# --------------------------------------------------------------------------- validation
def _check_table(name, table, n_first):
    if len(table) != N_FIELDS:
        raise ValueError(f"{name} must have {N_FIELDS} rows {FIELDS}, got {len(table)}")
    n = len(table[0])
    for f in range(N_FIELDS):
        if len(table[f]) != n:
            raise ValueError(f"{name}.{FIELDS[f]} has {len(table[f])} entries, "
                             f"{name}.{FIELDS[0]} has {n}")
    for i in range(n):
        inp, pre, out = table[R_INPUT][i], table[R_PREFIX][i], table[R_OUTPUT][i]
        mx, ieos, pred = table[R_MAX_NEW][i], table[R_IGNORE_EOS][i], table[R_PRED][i]
        if inp < 1:
            raise ValueError(f"{name}.input_len[{i}] must be >= 1, got {inp}")
        if pre < 0:
            raise ValueError(f"{name}.prefix_len[{i}] must be >= 0, got {pre}")
        if out < 0:
            raise ValueError(f"{name}.output_len[{i}] must be >= 0, got {out}")
        if mx < 1:
            raise ValueError(f"{name}.max_new_tokens[{i}] must be >= 1, got {mx}")
        if ieos != 0 and ieos != 1:
            raise ValueError(f"{name}.ignore_eos[{i}] must be 0 or 1, got {ieos}")
        if pred < 1:
            raise ValueError(f"{name}.pred_output_len[{i}] must be >= 1, got {pred}")
        if pre > inp + out:
            raise ValueError(f"{name}.prefix_len[{i}] = {pre} exceeds input_len + output_len"
                             f" = {inp + out}")
        if out > mx:
            raise ValueError(f"{name}.output_len[{i}] = {out} exceeds max_new_tokens = {mx}")
    return n


def _check_times(name, times, n, table_name):
    """Arrival times: one per request of ``table_name``, finite, >= 0, non-decreasing."""
    if len(times) != n:
        raise ValueError(f"{name} has {len(times)} entries, {table_name} has {n} requests")
    previous = 0.0
    for i in range(n):
        t = times[i]
        if not (t >= previous and t < INF):  # also rejects NaN
            raise ValueError(f"{name}[{i}] must be finite, >= 0 and >= the previous time, "
                             f"got {t}")
        previous = t


def _check_future(table, times):
    n = _check_table("future", table, 0)
    _check_times("future_t", times, n, "future")
    for i in range(n):
        if table[R_OUTPUT][i] != 0:
            raise ValueError(f"future.output_len[{i}] must be 0 (not yet arrived), "
                             f"got {table[R_OUTPUT][i]}")


def validate(running, waiting, pending, iscal, fscal, coeffs, cand, future=None,
             pending_t=None):
    """Raise ValueError naming the first bad field; the compiled kernel raises the same."""
    _check_table("running", running, 0)
    n_wait = _check_table("waiting", waiting, 0)
    n_pend = _check_table("pending", pending, 0)
    if pending_t is not None:
        _check_times("pending_t", pending_t, n_pend, "pending")
    if future is not None:
        _check_future(*future)
    if len(iscal) != N_ISCAL:
        raise ValueError(f"iscal must have {N_ISCAL} entries {ISCAL_NAMES}, got {len(iscal)}")
    if len(fscal) != N_FSCAL:
        raise ValueError(f"fscal must have {N_FSCAL} entries {FSCAL_NAMES}, got {len(fscal)}")
    if len(coeffs) != N_COEFFS:
        raise ValueError(f"step model coefficients must have {N_COEFFS} entries, "
                         f"got {len(coeffs)}")
    if len(cand) != N_CAND:
        raise ValueError(f"candidate must have {N_CAND} entries {CAND_NAMES}, got {len(cand)}")
    for k in range(N_COEFFS):
        c = coeffs[k]
        if not (c >= 0.0 and c < INF):  # also rejects NaN
            raise ValueError(f"step model coefficient {COEFF_NAMES[k]} must be finite and "
                             f">= 0, got {c}")
    for k in range(N_FSCAL):
        v = fscal[k]
        if not (v >= 0.0 and v < INF):
            raise ValueError(f"{FSCAL_NAMES[k]} must be finite and >= 0, got {v}")
    if fscal[F_RATIO] > 1.0 or fscal[F_INIT_RATIO] > 1.0 or fscal[F_MIN_RATIO] > 1.0:
        raise ValueError(f"new_token_ratio values must be <= 1, got {fscal[F_RATIO]}, "
                         f"{fscal[F_INIT_RATIO]}, {fscal[F_MIN_RATIO]}")
    page = iscal[I_PAGE]
    if page < 1:
        raise ValueError(f"page_size must be >= 1, got {page}")
    if iscal[I_MAX_TOTAL] < 1:
        raise ValueError(f"max_total_num_tokens must be >= 1, got {iscal[I_MAX_TOTAL]}")
    if iscal[I_FREE] < 0:
        raise ValueError(f"free_kv_tokens must be >= 0, got {iscal[I_FREE]}")
    if iscal[I_EVICTABLE] < 0:
        raise ValueError(f"evictable_tokens must be >= 0, got {iscal[I_EVICTABLE]}")
    if iscal[I_FREE] + iscal[I_EVICTABLE] > iscal[I_MAX_TOTAL]:
        raise ValueError(f"free_kv_tokens + evictable_tokens = "
                         f"{iscal[I_FREE] + iscal[I_EVICTABLE]} exceeds max_total_num_tokens"
                         f" = {iscal[I_MAX_TOTAL]}")
    if iscal[I_MAX_RUNNING] < 1:
        raise ValueError(f"max_running_requests must be >= 1, got {iscal[I_MAX_RUNNING]}")
    if 0 < iscal[I_CHUNK] < page:
        raise ValueError(f"chunked_prefill_size must be <= 0 (disabled) or >= page_size, "
                         f"got {iscal[I_CHUNK]}")
    if iscal[I_MAX_PREFILL] < 1:
        raise ValueError(f"max_prefill_tokens must be >= 1, got {iscal[I_MAX_PREFILL]}")
    if iscal[I_POLICY] != POLICY_FCFS and iscal[I_POLICY] != POLICY_LPM:
        raise ValueError(f"schedule_policy must be 0 (fcfs) or 1 (lpm), got {iscal[I_POLICY]}")
    ci = iscal[I_CHUNKED_IDX]
    if ci < -1 or ci >= n_wait:
        raise ValueError(f"chunked_idx must be -1 or index a waiting request (< {n_wait}), "
                         f"got {ci}")
    if ci >= 0:
        if iscal[I_CHUNK] <= 0:
            raise ValueError("chunked_idx is set but chunked prefill is disabled "
                             "(chunked_prefill_size <= 0)")
        fill = waiting[R_INPUT][ci] + waiting[R_OUTPUT][ci]
        done = iscal[I_CHUNKED_DONE]
        if done < waiting[R_PREFIX][ci] or done >= fill:
            raise ValueError(f"chunked_prefilled must lie in [prefix_len, input_len + "
                             f"output_len) of waiting[{ci}] = [{waiting[R_PREFIX][ci]}, {fill})"
                             f", got {done}")
    if iscal[I_BATCH_FULL] != 0 and iscal[I_BATCH_FULL] != 1:
        raise ValueError(f"batch_is_full must be 0 or 1, got {iscal[I_BATCH_FULL]}")
    if iscal[I_CLIP] < 1:
        raise ValueError(f"clip_max_new_tokens must be >= 1, got {iscal[I_CLIP]}")
    if iscal[I_RETRACT_STEPS] < 0:
        raise ValueError(f"retract_decode_steps must be >= 0, got {iscal[I_RETRACT_STEPS]}")
    if cand[C_INPUT] < 1:
        raise ValueError(f"candidate.input_len must be >= 1, got {cand[C_INPUT]}")
    if cand[C_PREFIX] < 0 or cand[C_PREFIX] > cand[C_INPUT]:
        raise ValueError(f"candidate.prefix_len must lie in [0, input_len = {cand[C_INPUT]}]"
                         f", got {cand[C_PREFIX]}")
    if cand[C_PRED] < 1:
        raise ValueError(f"candidate.pred_output_len must be >= 1, got {cand[C_PRED]}")
    if cand[C_MAX_NEW] < 1:
        raise ValueError(f"candidate.max_new_tokens must be >= 1, got {cand[C_MAX_NEW]}")
    if cand[C_IGNORE_EOS] != 0 and cand[C_IGNORE_EOS] != 1:
        raise ValueError(f"candidate.ignore_eos must be 0 or 1, got {cand[C_IGNORE_EOS]}")


# --------------------------------------------------------------------------- the model
def step_time(c, prefill_tokens, prefill_context_tokens, decode_seqs, decode_context_tokens):
    """``StepModel.step_time`` (block_sgl/predictor/step_model.py) from the coefficient array."""
    n = prefill_tokens + decode_seqs
    if n <= 0:
        return 0.0
    return (c[0] + c[1] * max(n - c[2], 0.0) + c[3] * prefill_context_tokens
            + c[4] * decode_context_tokens)


def decode_run_time(c, k, bs, ctx):
    """Sum of ``k`` decode steps of ``bs`` sequences, context ``ctx`` growing by ``bs`` a step.

    Closed form of ``sum(step_time(c, 0, 0.0, bs, ctx + j * bs) for j in range(k))``; for
    ``k == 1`` it equals ``step_time`` bit for bit.
    """
    return k * (c[0] + c[1] * max(bs - c[2], 0.0)) + c[4] * (k * ctx + bs * (k * (k - 1) // 2))


def ceil_page(tokens, page):
    return -(-tokens // page) * page


class _Req:
    """One request. While running, its output count at decode step ``D`` is
    ``out + D - d0``; it finishes when that reaches ``tgt``."""

    __slots__ = ("inp", "pre", "out", "mx", "ieos", "tgt", "d0", "seq")

    def __init__(self, inp, pre, out, mx, ieos, pred):
        self.inp, self.pre, self.out, self.mx, self.ieos = inp, pre, out, mx, ieos
        # finishes at min(predicted, max_new); it makes at least one more token
        self.tgt = max(min(pred, mx), out + 1)
        self.d0 = 0
        self.seq = 0


class SimStep(NamedTuple):
    """One simulated step (or a closed-form stretch of decode steps), for ``simulate(..., trace=list)``.
    Request ids count through running, waiting, pending, the candidate, future, in order."""

    start_s: float
    """From the snapshot."""
    end_s: float
    kind: str
    """``"extend"`` or ``"decode"``."""
    steps: int
    """Decode steps in the stretch (1 for an extend)."""
    batch: int
    """Requests decoding (decode) or prefilled (extend) in it."""
    extend: tuple = ()
    """Extend only: ``(id, new tokens, tokens already in KV, prefill complete)`` per request."""


class _Sim:
    trace = None  # a list to append SimSteps to (``simulate(..., trace=list)``), else None

    def __init__(self, running, waiting, pending, iscal, fscal, coeffs, cand, step_by_step,
                 future=None, pending_t=None):
        self.c = [float(x) for x in coeffs]
        self.page = iscal[I_PAGE]
        self.max_running = iscal[I_MAX_RUNNING]
        self.chunk_size = iscal[I_CHUNK] if iscal[I_CHUNK] > 0 else None  # None: disabled
        self.max_prefill = iscal[I_MAX_PREFILL]
        self.lpm = iscal[I_POLICY] == POLICY_LPM
        self.clip = iscal[I_CLIP]
        self.retract_steps = iscal[I_RETRACT_STEPS]
        self.ratio_base, self.ndecay = fscal[F_RATIO], 0
        self.min_ratio, self.decay = fscal[F_MIN_RATIO], fscal[F_DECAY]
        self.elapsed = fscal[F_ELAPSED]  # when the candidate arrives
        self.step_by_step = step_by_step

        self.pool = iscal[I_FREE] + iscal[I_EVICTABLE]  # KV tokens free or evictable
        self.D = 0          # decode steps run so far
        self.t = 0.0        # seconds from the snapshot
        self.batch_full = iscal[I_BATCH_FULL] == 1
        # running batch
        self.heap = []      # (finish decode step, id)
        self.bs = 0
        self.ctx_base = 0   # sum(inp + out - d0): decode context = ctx_base + bs * D
        self.sum_m = [0, 0]  # per ignore_eos: sum of (mx - out + d0): remaining = M - D
        self.cnt = [0, 0]
        self.big = set()    # running ids whose remaining may still exceed clip
        self.running = set()
        self.next_seq = 0

        self.reqs = []
        for table in (running, waiting, pending):
            for i in range(len(table[0])):
                self.reqs.append(_Req(table[R_INPUT][i], table[R_PREFIX][i],
                                      table[R_OUTPUT][i], table[R_MAX_NEW][i],
                                      table[R_IGNORE_EOS][i], table[R_PRED][i]))
        n_run, n_wait = len(running[0]), len(waiting[0])
        self.n_snapshot = n_run + n_wait  # ids below this were in the snapshot
        # (arrival time, id) of every request not in the snapshot, in arrival (= id) order
        self.arrivals = [(min(pending_t[i], self.elapsed) if pending_t is not None else 0.0,
                          self.n_snapshot + i) for i in range(len(pending[0]))]
        self.cand = len(self.reqs)
        self.reqs.append(_Req(cand[C_INPUT], cand[C_PREFIX], 0, cand[C_MAX_NEW],
                              cand[C_IGNORE_EOS], cand[C_PRED]))
        self.arrivals.append((self.elapsed, self.cand))
        if future is not None:
            table, times = future
            for i in range(len(table[0])):
                self.arrivals.append((self.elapsed + times[i], len(self.reqs)))
                self.reqs.append(_Req(table[R_INPUT][i], table[R_PREFIX][i], 0,
                                      table[R_MAX_NEW][i], table[R_IGNORE_EOS][i],
                                      table[R_PRED][i]))
        self.fi = 0  # the next arrival
        for rid in range(n_run, len(self.reqs)):
            r = self.reqs[rid]  # a match never covers the last token (Req._compute_max_prefix_len)
            r.pre = min(r.pre, r.inp + r.out - 1)
        for rid in range(n_run):
            self.join(rid)
        ci = iscal[I_CHUNKED_IDX]
        self.chunk = n_run + ci if ci >= 0 else -1
        self.chunk_done = iscal[I_CHUNKED_DONE]
        self.queue = [rid for rid in range(n_run, self.n_snapshot) if rid != self.chunk]
        self.needs_sort = True

        self.ttft = self.e2e = self.queue_s = INF
        self.done = False

    # -- running batch bookkeeping ----------------------------------------------------------
    def held(self, rid):
        """KV tokens a running request holds (released when it finishes or is retracted)."""
        r = self.reqs[rid]
        return max(r.inp + r.out + self.D - r.d0 - 1 - r.pre, 0)

    def join(self, rid):
        r = self.reqs[rid]
        r.d0, r.seq = self.D, self.next_seq
        self.next_seq += 1
        self.running.add(rid)
        heapq.heappush(self.heap, (self.D + r.tgt - r.out, rid))
        self.bs += 1
        self.ctx_base += r.inp + r.out - self.D
        m = r.mx - r.out + self.D
        self.sum_m[r.ieos] += m
        self.cnt[r.ieos] += 1
        if m - self.clip > self.D:
            self.big.add(rid)

    def leave(self, rid):
        r = self.reqs[rid]
        r.out += self.D - r.d0
        self.running.discard(rid)
        self.big.discard(rid)
        self.bs -= 1
        self.ctx_base -= r.inp + r.out - self.D
        self.sum_m[r.ieos] -= r.mx - r.out + self.D
        self.cnt[r.ieos] -= 1

    def ratio(self):
        if self.ndecay == 0:
            return self.ratio_base
        return max(self.ratio_base - self.ndecay * self.decay, self.min_ratio)

    def running_offset(self):
        """PrefillAdder.__init__: sum of min(max_new - out, clip) x (1 or new_token_ratio)."""
        s = [self.sum_m[0] - self.cnt[0] * self.D, self.sum_m[1] - self.cnt[1] * self.D]
        self.big = {rid for rid in self.big
                    if self.reqs[rid].mx - self.reqs[rid].out + self.reqs[rid].d0 - self.clip
                    > self.D}
        for rid in self.big:
            r = self.reqs[rid]
            s[r.ieos] -= r.mx - r.out + r.d0 - self.clip - self.D
        return self.ratio() * s[0] + s[1]

    def advance(self, dt):
        self.t += dt

    def finish_running(self):
        """Pop every running request whose last token came out at decode step D."""
        while self.heap and self.heap[0][0] <= self.D:
            _, rid = heapq.heappop(self.heap)
            self.pool += self.held(rid)
            self.leave(rid)
            self.batch_full = False
            if rid == self.cand:
                self.e2e, self.done = self.t, True
                return

    # -- admission: Scheduler._get_new_batch_prefill_raw + PrefillAdder ------------------------
    def admit(self):
        """Return [(id, extend, tokens already in KV, prefill complete)] of the next EXTEND."""
        if self.bs == 0:
            self.batch_full = False
        if (self.batch_full or not self.queue) and self.chunk < 0:
            return []
        if self.chunk < 0 and self.bs >= self.max_running:
            self.batch_full = True
            return []
        if self.lpm and self.needs_sort and len(self.queue) <= LPM_MAX_QUEUE:
            self.queue.sort(key=lambda rid: -self.reqs[rid].pre)  # stable
            self.needs_sort = False

        page, pool = self.page, self.pool
        b = {"total": self.running_offset(), "cur": 0, "input": self.max_prefill,
             "chunk": self.chunk_size}

        def reserve(extend, max_new):  # PrefillAdder._update_prefill_budget
            ep = ceil_page(extend, page)
            b["total"] += ep + page + max_new
            b["cur"] += ep + page
            b["input"] -= ep
            if b["chunk"] is not None:
                b["chunk"] -= ep

        def budget_state():
            if not (pool - b["total"] > 0 and pool - b["cur"] > 0):
                return NO_TOKEN
            if b["input"] <= 0 or (b["chunk"] is not None and b["chunk"] <= 0):
                return OTHER
            return CONTINUE

        adm = []
        if self.chunk >= 0:  # PrefillAdder.add_chunked_req
            r = self.reqs[self.chunk]
            rem = min(b["chunk"], int(pool - b["total"]))
            if rem <= 0:
                rem = b["chunk"]
            ext = r.inp + r.out - self.chunk_done
            truncated = ext > rem
            e = min(ext, rem)
            reserve(e, 0 if truncated else min(r.mx, self.clip))
            adm.append((self.chunk, e, self.chunk_done, not truncated))
            if truncated:
                self.chunk_done += e
            else:
                self.chunk = -1

        taken = set()
        for rid in self.queue:
            if budget_state() == OTHER:
                break
            if len(adm) >= self.max_running - self.bs:
                self.batch_full = True
                break
            r = self.reqs[rid]  # PrefillAdder.add_one_req / _select_prefill_admission
            ext = r.inp + r.out - r.pre
            total = ext + min(max(r.mx - r.out, 0), self.clip) + page
            if not total < pool - b["total"]:
                self.batch_full = len(adm) > 0 or self.bs > 0
                break
            ep = ceil_page(ext, page)
            if b["chunk"] is None and adm and ep >= b["input"]:
                break
            if b["chunk"] is not None and ep > b["chunk"]:  # becomes THE chunked request
                e = b["chunk"] // page * page
                e = (r.pre + e) // page * page - r.pre
                if e <= 0:
                    break
                reserve(e, 0)
                adm.append((rid, e, r.pre, False))
                self.chunk, self.chunk_done = rid, r.pre + e
            else:
                reserve(ext, min(r.mx, self.clip))
                adm.append((rid, ext, r.pre, True))
            taken.add(rid)
            state = budget_state()
            if state != CONTINUE:
                if state == NO_TOKEN:
                    self.batch_full = True
                break
        if taken:
            self.queue = [rid for rid in self.queue if rid not in taken]
        return adm

    def run_extend(self, adm):
        tokens, pairs = 0, 0.0
        for rid, e, p, _ in adm:
            tokens += e
            pairs += e * (p + (e + 1) / 2.0)
        t_start = self.t
        self.advance(step_time(self.c, tokens, pairs, 0, 0))
        if self.trace is not None:
            self.trace.append(SimStep(t_start, self.t, "extend", 1, len(adm), tuple(adm)))
        self.pool -= tokens
        reset_full = self.bs == 0 or self.chunk >= 0 and any(a[0] == self.chunk for a in adm)
        for rid, _, _, complete in adm:
            if rid == self.cand and self.queue_s == INF:
                self.queue_s = t_start
            if not complete:
                continue
            r = self.reqs[rid]
            r.out += 1  # the extend samples the first (next) token
            if rid == self.cand:
                self.ttft = self.t
            if r.out >= r.tgt:  # finished at prefill: filtered out before the merge
                self.pool += max(r.inp + r.out - 1 - r.pre, 0)
                reset_full = True
                if rid == self.cand:
                    self.e2e, self.done = self.t, True
            else:
                self.join(rid)
        if reset_full:
            self.batch_full = False

    # -- decode: Scheduler.update_running_batch --------------------------------------------
    def retract(self):
        """ScheduleBatch.retract_decode; the KV pool cannot hold one more token per request."""
        order = sorted(self.running, key=lambda rid: (
            -(self.reqs[rid].out + self.D - self.reqs[rid].d0), self.reqs[rid].inp,
            self.reqs[rid].seq))
        retracted, first_iter = [], True
        while first_iter or not self.pool >= len(order):
            if len(order) == 1:
                break
            first_iter = False
            rid = order.pop()
            self.pool += self.held(rid)
            retracted.append(rid)
        aborted = -1
        if len(order) <= 1 and not self.pool >= len(order):
            aborted = order.pop()
            self.pool += self.held(aborted)
        for rid in retracted + ([aborted] if aborted >= 0 else []):
            self.leave(rid)
        if retracted or aborted >= 0:
            self.heap = [(self.reqs[rid].d0 + self.reqs[rid].tgt - self.reqs[rid].out, rid)
                         for rid in order]
            heapq.heapify(self.heap)
        sum_out = sum(self.reqs[rid].out + self.D - self.reqs[rid].d0 for rid in order)
        sum_mx = sum(self.reqs[rid].mx for rid in order)
        self.ratio_base = min(1.0, (sum_out + self.retract_steps * len(order)) / (sum_mx + 1))
        self.ndecay = 0
        for rid in retracted:  # back to the END of the waiting queue, to be prefilled again
            r = self.reqs[rid]
            r.pre = min(r.pre, r.inp + r.out - 1)
            self.queue.append(rid)
        self.needs_sort = True
        self.batch_full = False
        if aborted == self.cand:
            self.done = True

    def run_decode(self, k):
        ctx = self.ctx_base + self.bs * self.D
        t_start = self.t
        self.advance(decode_run_time(self.c, k, self.bs, ctx))
        if self.trace is not None:
            self.trace.append(SimStep(t_start, self.t, "decode", k, self.bs))
        self.pool -= k * self.bs
        self.D += k
        self.finish_running()

    def decode_jump_len(self):
        """Decode steps that surely run with no admission, completion or retraction between."""
        if self.step_by_step or self.chunk >= 0:
            return 0
        if self.bs == 0:
            return 0
        if self.bs >= self.max_running:
            self.batch_full = True
        if not (self.batch_full or not self.queue):
            return 0
        return min(self.heap[0][0] - self.D, self.pool // self.bs)

    # -- future arrivals -----------------------------------------------------------------
    def arrive(self):
        """Queue every future request that has arrived by now (end of the queue, in order)."""
        while self.fi < len(self.arrivals) and self.arrivals[self.fi][0] <= self.t:
            self.queue.append(self.arrivals[self.fi][1])
            self.fi += 1
            self.needs_sort = True

    def jump_until_arrival(self, k):
        """The decode jump ``k`` cut at the step during which the next request arrives (the
        smallest ``j`` whose end time reaches it), by bisection on the closed form."""
        if self.fi >= len(self.arrivals):
            return k
        arrival = self.arrivals[self.fi][0]
        ctx = self.ctx_base + self.bs * self.D
        if self.t + decode_run_time(self.c, k, self.bs, ctx) < arrival:
            return k
        lo, hi = 1, k  # the answer lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if self.t + decode_run_time(self.c, mid, self.bs, ctx) >= arrival:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # -- the loop --------------------------------------------------------------------------
    def run(self):
        while not self.done:
            self.arrive()
            k = self.decode_jump_len()
            if k >= 1:
                k = self.jump_until_arrival(k)
            if k >= 1:
                self.ndecay += k
                self.run_decode(k)
            else:
                adm = self.admit()
                if adm:
                    self.run_extend(adm)
                elif self.bs > 0:
                    if self.pool < self.bs:  # check_decode_mem failed
                        self.retract()
                    else:
                        self.ndecay += 1
                    if self.bs > 0 and not self.done:
                        self.run_decode(1)
                elif self.fi < len(self.arrivals):
                    self.t = max(self.t, self.arrivals[self.fi][0])  # idle until it arrives
                else:
                    break  # nothing can ever run: the candidate waits forever
        # from the candidate's arrival (inf stays inf)
        return self.ttft - self.elapsed, self.e2e - self.elapsed, self.queue_s - self.elapsed


def simulate(running, waiting, pending, iscal, fscal, coeffs, cand, workspace=None,
             step_by_step=False, future=None, future_t=None, pending_t=None, trace=None):
    """Predict ``(ttft_s, e2e_s, queue_s)`` of ``cand``, in seconds from its arrival
    (``elapsed_s`` after the snapshot); ``inf`` where it never happens.

    Same contract as ``block_sgl._fastsim.simulate``; ``workspace`` is ignored here. With
    ``step_by_step`` every decode step is simulated one at a time (the reference the closed-form
    jumps are tested against). ``future`` / ``future_t``: expected arrivals (both or neither);
    ``pending_t``: when each pending request arrives (default: at the snapshot). ``trace``
    (this twin only): a list that receives every simulated step as a ``SimStep``.
    """
    fut = _future_arg(future, future_t)
    validate(running, waiting, pending, iscal, fscal, coeffs, cand, fut, pending_t)
    conv = [[[int(x) for x in row] for row in t] for t in (running, waiting, pending)]
    if fut is not None:
        fut = ([[int(x) for x in row] for row in fut[0]], [float(x) for x in fut[1]])
    if pending_t is not None:
        pending_t = [float(x) for x in pending_t]
    sim = _Sim(conv[0], conv[1], conv[2], [int(x) for x in iscal],
               [float(x) for x in fscal], coeffs, [int(x) for x in cand], step_by_step, fut,
               pending_t)
    sim.trace = trace
    return sim.run()


def _future_arg(future, future_t):
    if (future is None) != (future_t is None):
        raise ValueError("give both future and future_t, or neither")
    return None if future is None else (future, future_t)


def simulate_many(states, cands, coeffs, out, workspace=None):
    """``simulate`` over K instances (``states[i]`` = ``(running, waiting, pending, iscal,
    fscal)``, optionally followed by ``future, future_t`` (each may be None) and then
    ``pending_t``); fills ``out[i] = (ttft_s, e2e_s, queue_s)`` after validating every input."""
    k = len(states)
    if len(cands) != k or len(coeffs) != k or tuple(out.shape) != (k, 3):
        raise ValueError(f"got {k} states, {len(cands)} candidates, {len(coeffs)} step models "
                         f"and out of shape {tuple(out.shape)[:2]}: need K each and (K, 3)")
    for i in range(k):
        st = states[i]
        if len(st) not in (5, 7, 8):
            raise ValueError(f"states[{i}] must have 5, 7 or 8 arrays, got {len(st)}")
        validate(*st[:5], coeffs[i], cands[i], _future_arg(*st[5:7]) if len(st) >= 7 else None,
                 st[7] if len(st) == 8 else None)
    for i in range(k):
        st = states[i]
        out[i] = simulate(*st[:5], coeffs[i], cands[i], future=st[5] if len(st) >= 7 else None,
                          future_t=st[6] if len(st) >= 7 else None,
                          pending_t=st[7] if len(st) == 8 else None)
    return out

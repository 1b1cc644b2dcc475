"""One batch engine over several ranks: rank 0 decides, the other ranks repeat.

With the model split over the ranks of an `mx.distributed` group (tensor or pipeline parallel),
every model call must happen on every rank, in the same order, on the same inputs. The batch
engine is deterministic given the calls made to it (`add`, `cancel`, `reset`, `step`) and the
tokens it samples, so:

- `Leader` (rank 0's engine, driven by the server's worker) sends the calls made since the last
  step to the other ranks before each step, as one broadcast (`broadcast_text`: the prompt's token
  ids, max_tokens and stop strings of each new sequence; the uids cancelled), and shares every
  token it samples (one `all_sum` per sampling, the others contributing zeros): the sampler, the
  logits processors and constraints of each request run on rank 0 alone;
- `follow` (every other rank) receives the calls and makes them on its own engine, whose rows are
  all greedy: the tokens it feeds are rank 0's. Its text streams end each sequence where rank 0's
  do (same tokens, same stop strings, same max_tokens).

While rank 0 has nothing to do it sends a heartbeat every `HEARTBEAT` seconds, so a lost rank
(the ring backend's RuntimeError) or a hung one (the watchdog) is noticed on every side even when
no request comes.
"""

from __future__ import annotations

import json

from .. import distributed
from .core import BatchEngine

HEARTBEAT = 2.0  # most seconds between two messages of rank 0 (while idle)


class _Ranked(BatchEngine):
    def __init__(self, model, tokenizer, group, watchdog=None, **kwargs):
        self.group, self.watchdog = group, watchdog
        super().__init__(model, tokenizer, **kwargs)

    def _sample(self, rows, logits):
        tokens, logprobs = BatchEngine._sample(rows, logits)
        return distributed.from_rank0(tokens, self.group), logprobs

    def _beat(self) -> None:
        if self.watchdog is not None:
            self.watchdog.beat()


class Leader(_Ranked):
    """Rank 0's engine: each step's calls reach the other ranks first."""

    def __init__(self, *args, **kwargs):
        self._ops: list = []
        super().__init__(*args, **kwargs)

    def add(self, prompt, *, max_tokens: int = 256, sampler=None, logits_processors=None, stop=None,
            logprobs: bool = False) -> int:
        uid = super().add(prompt, max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
                          stop=stop, logprobs=logprobs)
        self._ops.append(["add", uid, [int(t) for t in prompt], int(max_tokens), list(stop or [])])
        return uid

    def cancel(self, uid: int) -> None:
        super().cancel(uid)
        self._ops.append(["cancel", uid])

    def reset(self) -> list[int]:
        self._ops.append(["reset"])
        return super().reset()

    def _send(self, step: bool) -> None:
        self._beat()
        message = "" if step and not self._ops else json.dumps({"ops": self._ops, "step": step})
        self._ops = []
        distributed.broadcast_text(message, self.group)

    def step(self):
        self._send(True)
        return super().step()

    def heartbeat(self) -> None:
        """Tells the other ranks rank 0 is alive (and passes on calls made since the last step)."""
        self._send(False)

    def close(self) -> None:
        """Lets the other ranks stop following."""
        self._beat()
        distributed.broadcast_text(None, self.group)


class Follower(_Ranked):
    """Another rank's engine: greedy rows fed rank 0's tokens."""

    def apply(self, ops: list) -> None:
        for op in ops:
            if op[0] == "add":
                _, uid, prompt, max_tokens, stop = op
                got = self.add(prompt, max_tokens=max_tokens, stop=stop or None)
                if got != uid:
                    raise distributed.DistributedError(f"rank {self.group.rank()}: out of step with rank 0 "
                                                       f"(sequence {got}, rank 0 has {uid})")
            elif op[0] == "cancel":
                self.cancel(op[1])
            elif op[0] == "reset":
                self.reset()


def follow(model, tokenizer, group, watchdog=None, **kwargs) -> None:
    """Repeats rank 0's engine calls until rank 0 closes; kwargs are BatchEngine's (the same as rank 0's)."""
    core = Follower(model, tokenizer, group, watchdog, **kwargs)
    while True:
        core._beat()  # rank 0 sends at least every HEARTBEAT seconds
        message = distributed.broadcast_text(None, group)
        if message is None:
            return
        if message == "":
            core.step()
            continue
        data = json.loads(message)
        core.apply(data["ops"])
        if data["step"]:
            core.step()

"""The producer/consumer activation buffer of App. A.1, serving every row `passes` times.

Activations of neighbouring positions in one document are highly correlated (§3.1), so the SAE
must see them in random order, yet holding a whole dataset of activations is impossible at scale.
The buffer holds `size` rows. Training starts when it is full; each minibatch takes the next unread
rows; when half of the buffer has been read, the rows that are used up are replaced by new rows
from the producer and the WHOLE buffer is shuffled, so new rows mix with the old ones.

With passes = 1 (the paper) every produced row is served exactly once. A short run on a slow LM
serves each row `passes` times instead (recipe.budget_rule chooses how many): a row stays in the
buffer until it has been served that often, so the LM makes 1/passes of the rows the SAE trains
on, and the memory stays `size` rows however long the run. The first fill starts with staggered
use counts (1..passes), so the buffer mixes old and new rows from the first refill on instead of
replaying its first fill `passes` times.

The producer is any iterator of (n, C) tensors (n may vary, C fixed): the LM's rows
(data.activation_producer), or pre-saved activations (App. A.3, activations.py). This file imports
nothing from the project, so it is tested with a fake producer.
"""
import collections
import ctypes
import math

import torch


class ActivationBuffer:
    def __init__(self, producer, size, batch_size, seed=0, device="cpu", rows_to_serve=None,
                 passes=1):
        """rows_to_serve: in all (None: endless); the producer is asked for no row the run will
        not use. passes: how many times each row is served."""
        assert batch_size <= size // 2, "batch_size must be at most half the buffer"
        self.producer, self.size, self.batch_size = iter(producer), size, batch_size
        self.passes, self.device = passes, device
        self.remaining = math.inf if rows_to_serve is None else rows_to_serve  # still to serve
        self.generator = torch.Generator().manual_seed(seed)
        self.pending = []  # rows made by the producer that did not fit yet, served first next time
        self.data = None  # (n, C), n <= size, allocated at the first fill
        self.uses = None  # (n,) how many more times each row of data will be served
        self.read = 0  # rows of data served since the last refill (they sit at data[:read])
        self.exhausted = False

    def _take(self, n):
        """Up to n new rows from the pending rows, then from the producer."""
        got, have = [], 0
        while have < n:
            if not self.pending:
                if self.exhausted:
                    break
                try:
                    self.pending.append(next(self.producer).to(self.device))
                except StopIteration:
                    self.exhausted = True
                    break
            x = self.pending.pop(0)
            if have + len(x) > n:
                x, rest = x[:n - have], x[n - have:]
                self.pending.insert(0, rest)
            got.append(x)
            have += len(x)
        return torch.cat(got) if got else None

    def _refill(self):
        """Drop the used-up rows, add as many new rows as fit and the run still needs, shuffle."""
        if self.data is None:  # the first fill: use counts staggered over 1..passes
            new = self._take(min(self.size, first_fill_rows(self.remaining, self.passes)))
            if new is None:
                raise RuntimeError("the activation producer yielded no rows")
            self.data = new
            self.uses = torch.randint(1, self.passes + 1, (len(new),), generator=self.generator,
                                      dtype=torch.int16).to(self.device)
        else:
            left = self.uses > 0
            self.data, self.uses = self.data[left], self.uses[left]
            owed = self.remaining - self.uses.sum().item()  # serves that held rows cannot cover
            want = max(_ceil(owed / self.passes), self.batch_size - len(self.data))  # >= a batch
            new = self._take(min(self.size - len(self.data), max(0, want)))
            if new is not None:
                self.data = torch.cat([new, self.data])
                self.uses = torch.cat([self.uses.new_full((len(new),), self.passes), self.uses])
        perm = torch.randperm(len(self.data), generator=self.generator).to(self.data.device)
        self.data, self.uses = self.data[perm], self.uses[perm]
        self.read = 0

    def next_batch(self):
        """(batch_size, C): the next minibatch, or None when the run's rows are all served or a
        finite producer has run dry."""
        if self.remaining < self.batch_size:
            return None
        if self.data is None or self.read >= max(self.size, len(self.data)) // 2 \
                or self.read + self.batch_size > len(self.data):
            self._refill()
        if self.read + self.batch_size > len(self.data):
            return None
        batch = self.data[self.read:self.read + self.batch_size]
        self.uses[self.read:self.read + self.batch_size] -= 1
        self.read += self.batch_size
        self.remaining -= self.batch_size
        return batch

    def state_dict(self):
        """Everything needed to continue exactly: rows and their uses, read pointer, pending rows,
        RNG state."""
        pending = torch.cat(self.pending) if self.pending else self.data[:0]
        return {"data": self.data, "uses": self.uses, "pending": pending,
                "generator": self.generator.get_state(), "read": self.read,
                "remaining": self.remaining, "exhausted": self.exhausted}

    def load_state_dict(self, state):
        self.data, self.read = state["data"].to(self.device), state["read"]
        self.uses = state["uses"].to(self.device)
        self.pending = [state["pending"].to(self.device)] if len(state["pending"]) else []
        self.generator.set_state(state["generator"])
        self.remaining, self.exhausted = state["remaining"], state["exhausted"]


def return_freed_memory():
    """Serve blocks over 1 MiB by mmap (glibc's M_MMAP_THRESHOLD), so freeing them returns them
    to the system. By default glibc raises that threshold to the largest block freed, after
    which a scope's many same-sized row tensors (buffers, queued LM batches) fragment the heap:
    40 sites kept ~1.2 GB more after their first refill. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _ceil(x):
    return x if x == math.inf else math.ceil(x)


def first_fill_rows(rows_to_serve, passes):
    """Rows the first fill needs: its rows' use counts are staggered over 1..passes, so they
    serve (passes + 1) / 2 times each on average. A buffer of this size holds a short run whole."""
    return _ceil(rows_to_serve * 2 / (passes + 1))


class FanOut:
    """One iterator per key over a producer of {key: rows} dicts, so that one LM forward feeds the
    buffers of every hooked site. Each key queues what it has not consumed yet; `made` counts the
    producer's items, which is all a resumed run needs to skip to the same place."""

    def __init__(self, producer, keys, made=0):
        self.producer, self.made = iter(producer), made
        self.queues = {key: collections.deque() for key in keys}

    def rows(self, key):
        while True:
            if not self.queues[key]:
                out = next(self.producer, None)
                if out is None:
                    return
                self.made += 1
                for k, q in self.queues.items():
                    q.append(out[k])
            yield self.queues[key].popleft()

    def __getitem__(self, key):
        return self.rows(key)

    def state_dict(self):
        """What a resumed run needs: the items made so far and what each key has not consumed."""
        return {"made": self.made, "queues": [list(q) for q in self.queues.values()]}

    def load_state_dict(self, state):
        self.made = state["made"]
        for q, saved in zip(self.queues.values(), state["queues"]):
            q.clear()
            q.extend(saved)

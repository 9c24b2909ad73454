"""The runner: the one place that opens a model's sessions, chooses precision and provider, falls back,
binds IO, and runs tile batches (in a worker thread while the host prepares the next one).

A run tries, in order, the asked-for precision on each asked-for provider, then float32 on the same
provider, then the next provider; float32 on the CPU comes last. A candidate that fails to start or
to run moves the run to the next one, and one warning says what failed and what runs instead.
What a provider can do (float16, bfloat16, IO binding, host or device) is its row in
:data:`napari_deepr.engine.providers.TRAITS`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import Cancelled, InputError, ModelError
from .contract import INT8_GENERATOR_FILE
from .fp16 import fp16_variant
from .providers import (
    PROVIDERS,
    SHORT_NAMES,
    bf16_provider_options,
    get_session,
    names_with,
    provider_traits,
    require_bf16,
    resolve_providers,
)

#: File of a model's int8 variant, beside its generator.
INT8_GENERATOR = INT8_GENERATOR_FILE


class Runner:
    """Sessions of one model for one run, with the fallback chain of (precision, providers).

    Parameters
    ----------
    model : DeepRModel
        The model.
    settings : RefocusSettings
        ``precision``, ``providers``, ``threads`` and ``dpm`` are read.
    warn : callable
        Called with each fallback sentence (the job warns once and keeps it).
    want_dpm : bool
        Whether the DPM decoder runs (it also does for a trust map's range test).

    Attributes
    ----------
    precision, provider : str
        What runs now (``provider`` is the short name onnxruntime reports).
    providers : list of str
        onnxruntime names of the candidate that runs, best first.
    io_binding : bool
        Whether the DPM decoder's inputs stay on the device (set by :meth:`open`'s caller; off after
        a fallback to a provider that cannot keep them).

    Raises
    ------
    InputError
        A precision this machine or model cannot run and no fallback would honour (fp16 asked of
        the CPU only, bf16 without OpenVINO, int8 without its variant).
    """

    def __init__(self, model, settings, warn: Callable[[str], None], want_dpm: bool):
        self.model, self.warn, self.want_dpm = model, warn, want_dpm
        self.threads = settings.threads
        self.requested_precision = self.precision = precision = settings.precision
        self.provider_options = None
        self.io_binding = False
        # Sentences about what could not run as asked; folded into one warning when sessions open.
        self._fallbacks: list[str] = []
        asked = settings.providers
        if precision == "bf16":
            self.providers = require_bf16()
            self.provider_options = bf16_provider_options(self.threads)
        else:
            self.providers = resolve_providers(asked, missing=self._fallbacks)
        if precision == "fp16" and not any(provider_traits(p).fp16 for p in self.providers):
            gpus = names_with("fp16")
            if not self._fallbacks and asked not in (None, "auto"):
                # Only the CPU was asked for: a setting to change, not a device that failed.
                raise InputError(
                    f"fp16 runs on GPU providers ({gpus}), and none is running here; "
                    "use fp32, or bf16 on a CPU that has it."
                )
            self._fallbacks.append(f"fp16 needs a GPU provider ({gpus}) and none is available here")
        if precision == "int8" and not (model.root / INT8_GENERATOR).is_file():
            raise InputError(f"Model {model.name} has no int8 variant; create it with 'deepr quantize {model.name}'.")
        self._chain = self._candidates()
        self._index = 0

    def _candidates(self) -> list[tuple[str, list[str], dict | None]]:
        """(precision, providers, provider options) to try in order."""
        req, out = self.requested_precision, []
        for i, full in enumerate(self.providers):
            tail = list(self.providers[i:])  # nodes the provider lacks go to the ones after it
            traits = provider_traits(full)
            if req == "fp16" and traits.fp16:
                out.append(("fp16", tail, None))
            elif req == "bf16" and traits.bf16:
                out.append(("bf16", tail, self.provider_options))
                continue  # OpenVINO's fp32 is slower than the CPU provider's (measured ~15 %)
            elif req == "int8":
                out.append(("int8", tail, None))
            out.append(("fp32", tail, None))
        return out

    @property
    def on_host(self) -> bool:
        """Whether the provider running now keeps its activations in the host's memory."""
        return provider_traits(self.provider).host

    def open(self, arena: bool | None, start: int = 0, why: str | None = None) -> None:
        """Open the generator (and DPM decoder) with the first candidate from ``start`` that starts.

        Every candidate that fails adds its reason; when the one that runs is not the first asked
        for, one warning says what failed and what runs instead.

        Raises
        ------
        ModelError
            When not even float32 on the CPU loads.
        """
        self.arena = arena
        reasons = list(self._fallbacks) + ([why] if why else [])
        self._fallbacks = []
        last = None
        for k in range(start, len(self._chain)):
            prec, provs, opts = self._chain[k]
            short = SHORT_NAMES.get(provs[0], provs[0])
            try:
                gpath, dpath = self._graph_paths(prec)
                sess, used = get_session(gpath, provs, self.threads, arena, opts, fallback=False)
                dsess = None
                if self.want_dpm:
                    dsess, dused = get_session(dpath, provs, self.threads, arena, opts, fallback=False)
                    used = used if dused == used else dused
                if PROVIDERS.get(used, used) != provs[0]:
                    # onnxruntime drops a provider that fails to initialise (missing CUDA libraries) with a log line only.
                    raise ModelError(f"{short} did not start (onnxruntime ran {used} instead)")
            except Exception as exc:  # noqa: BLE001 - any failure of a precision or provider moves to the next
                last = exc
                reasons.append(f"{prec} on {short} could not start ({one_line(exc)})")
                continue
            self._index = k
            self.precision, self.providers, self.provider_options = prec, provs, opts
            self.generator_path, self.dpm_path = gpath, dpath
            self.session, self.dpm_session, self.provider = sess, dsess, used
            if reasons:
                where = "CPU" if used == "cpu" else used
                also = f" in {prec}" if prec != self.requested_precision else ""
                self.warn(f"{'; '.join(reasons)}; falling back to {where}{also}.")
            return
        if len(self._chain) == 1 and isinstance(last, ModelError):  # only the CPU was tried: its own words
            raise last
        raise ModelError(f"No precision or provider could run model {self.model.name}: {'; '.join(reasons)}.")

    def _graph_paths(self, precision: str):
        """The generator and DPM decoder files for ``precision`` (float16 copies are made here)."""
        m = self.model
        if precision == "fp16":
            gen = fp16_variant(m.generator_path)
            return gen, (fp16_variant(m.dpm_path, feeds_from=m.generator_path) if self.want_dpm else m.dpm_path)
        if precision == "int8":
            return m.root / INT8_GENERATOR, m.dpm_path
        return m.generator_path, m.dpm_path

    def run(self, x: np.ndarray):
        """One network call on a batch ``x`` (N, C, H, W) of normalized tiles: ``(output, dpm or None)``.

        A failure moves to the next candidate (one warning) and runs the batch again there.

        Raises
        ------
        ModelError
            When the last candidate fails, or a network's output does not fit its input.
        """
        names = [self.model.output_name]
        if self.want_dpm:
            names += list(self.model.feature_names)
        stage = "generator"
        try:
            if self.io_binding:
                out, dpm = self._run_bound(x)
            else:
                res = self.session.run(names, {self.model.input_name: x})
                out, dpm = res[0], None
                if self.want_dpm:
                    stage = "dpm"
                    feeds = dict(zip(self.model.feature_names, res[1:], strict=True))
                    dpm = self.dpm_session.run(["dpm"] if "dpm" in _output_names(self.dpm_session) else None, feeds)[0]
            if self.precision != "fp32" and not (np.isfinite(out).all() and (dpm is None or np.isfinite(dpm).all())):
                # Half precision overflows at 65504: a reduced-precision graph that does is a failure of
                # that graph (float32 is tried next), not of the model.
                raise FloatingPointError(f"the {self.precision} graph gave NaN or infinite values")
        except Exception as exc:
            if self._index + 1 >= len(self._chain):
                if stage == "dpm":
                    raise ModelError(f"The DPM decoder of model {self.model.name} failed ({one_line(exc)}).") from exc
                raise ModelError(
                    f"Model {self.model.name} failed on a {x.shape[2]}×{x.shape[3]} tile ({one_line(exc)}); "
                    "it may need a fixed input size or be broken."
                ) from exc
            self.open(self.arena, self._index + 1, f"{self.precision} on {self.provider} failed while running ({one_line(exc)})")
            # IO binding stays only while a device that can keep the features runs the network.
            if provider_traits(self.provider).binding is None:
                self.io_binding = False
            return self.run(x)
        return self._checked(x, out, dpm)

    def _checked(self, x, out, dpm):
        """Refuse network outputs whose shape does not match the tile (a model that loads but is wrong)."""
        if getattr(out, "shape", None) != x.shape:
            raise ModelError(
                f"Model {self.model.name} returned an output of shape {tuple(getattr(out, 'shape', ()))} for an input of "
                f"shape {x.shape}; a Deep-R generator must return an image of its input's size and channels."
            )
        if dpm is not None and (dpm.ndim != 4 or dpm.shape[0] != x.shape[0] or dpm.shape[2:] != x.shape[2:]):
            raise ModelError(
                f"The DPM decoder of model {self.model.name} returned shape {dpm.shape} for tiles of shape {x.shape}; "
                "it must return one defocus value per pixel."
            )
        return out, dpm

    def _run_bound(self, x: np.ndarray):
        """One network call with IO binding: the features feeding the DPM decoder never leave the device."""
        device = provider_traits(self.provider).binding or "cpu"
        b = self.session.io_binding()
        b.bind_cpu_input(self.model.input_name, x)
        b.bind_output(self.model.output_name)
        if self.want_dpm:
            for name in self.model.feature_names:
                b.bind_output(name, device)
        self.session.run_with_iobinding(b)
        values = b.get_outputs()
        out = values[0].numpy()
        if not self.want_dpm:
            return out, None
        d = self.dpm_session.io_binding()
        for name, v in zip(self.model.feature_names, values[1:], strict=True):
            d.bind_ortvalue_input(name, v)
        names = _output_names(self.dpm_session)
        d.bind_output("dpm" if "dpm" in names else names[0])
        self.dpm_session.run_with_iobinding(d)
        return out, d.get_outputs()[0].numpy()

    def batches(self, n: int, prepare: Callable[[int], np.ndarray], pool: ThreadPoolExecutor | None,
                is_cancelled: Callable[[], bool]) -> Iterator[tuple[int, tuple]]:
        """Run batches ``0..n-1`` (``prepare(i)`` fills batch i), yielding ``(i, (output, dpm))`` in order.

        With a ``pool`` (one worker) batch i+1 is prepared and queued while batch i runs, so the
        caller's work on a result (blending) overlaps the next network call; ``prepare`` must then
        alternate between two buffers.

        Raises
        ------
        Cancelled
            When ``is_cancelled()`` before a batch; the network call in flight ends first.
        """
        pending = None
        for i in range(n):
            if is_cancelled():
                if pending is not None and pool is not None:
                    _quietly_wait(pending)
                raise Cancelled("Refocus was cancelled; finished rows are kept.")
            nxt = None
            if pool is None:
                pending = _Done(self.run(prepare(i)))
            else:
                if pending is None:
                    pending = pool.submit(self.run, prepare(i))
                if i + 1 < n:  # queued behind batch i; its inputs are filled while i runs
                    nxt = pool.submit(self.run, prepare(i + 1))
            try:
                result = pending.result()
            except BaseException:
                if nxt is not None:
                    _quietly_wait(nxt)
                raise
            pending = nxt
            yield i, result


def cancel_check(cancel) -> Callable[[], bool]:
    """A function saying whether to stop, from a ``threading.Event``, a callable or None (never)."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise InputError("cancel must be a threading.Event or a callable returning True to stop.")


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when empty), without a final full stop."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")[:200]


def _output_names(sess) -> list[str]:
    return [o.name for o in sess.get_outputs()]


class _Done:
    """An already computed result with a future's ``result()``, for runs without the pipeline."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _quietly_wait(future) -> None:
    """Let an in-flight network call end (its error, if any, is superseded by the one being raised)."""
    with contextlib.suppress(BaseException):
        future.result()


__all__ = ["INT8_GENERATOR", "Runner", "cancel_check", "one_line"]

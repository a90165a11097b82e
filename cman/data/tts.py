"""Offline text-to-speech with espeak-ng (via ctypes on the library shipped by `espeakng-loader`).

The engine is initialised once per process (lazily, under a lock) in synchronous mode, so
`espeak_Synth` calls our callback with int16 chunks on the calling thread; no audio device is used.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# English voices ("<language>+<variant>", variants from espeak-ng-data/voices/!v shipped by
# espeakng-loader) whose output is reproducible: these variants set `flutter 0` and `roughness 0`.
# Other voices (the plain "en" included) modulate pitch from a counter that espeak-ng keeps across
# calls, so their waveform depends on what was synthesized before in the same process.
VOICES: list[str] = [
    "en+michel",
    "en+Denis",
    "en+Hugo",
    "en+Storm",
    "en+shelby",
    "en-us+Diogo",
    "en-us+Henrique",
    "en-us+miguel",
    "en-us+shelby",
    "en-gb-x-rp+michel",
    "en-gb-x-rp+Denis",
    "en-gb-x-rp+shelby",
]

# espeak-ng constants (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_EE_OK = 0
_EE_NOT_FOUND = 2
_RAND_SEED = 0

_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass
class _Engine:
    lib: ctypes.CDLL
    sample_rate: int
    pid: int
    chunks: list[np.ndarray] = field(default_factory=list)
    callback: object = None  # keeps the ctypes callback alive


_LOCK = threading.Lock()
_ENGINE: _Engine | None = None


def _load_library() -> tuple[ctypes.CDLL, str]:
    import espeakng_loader  # not installed: ModuleNotFoundError, which `cman` turns into "pip install 'cman[demo]'"

    lib_path = espeakng_loader.get_library_path()
    try:
        data_path = espeakng_loader.get_data_path()
        lib = ctypes.CDLL(lib_path)
    except (OSError, RuntimeError) as err:
        raise RuntimeError(f"could not load espeak-ng library {lib_path}: {err}") from err
    return lib, data_path


def _declare_signatures(lib: ctypes.CDLL) -> None:
    lib.espeak_Initialize.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK_TYPE]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.argtypes = []
    lib.espeak_Synchronize.restype = ctypes.c_int
    if hasattr(lib, "espeak_ng_SetRandSeed"):  # espeak-ng >= 1.52
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None


def _engine() -> _Engine:
    """Return the process-wide engine, initialising it on first use (or after a fork)."""
    global _ENGINE
    if _ENGINE is not None and _ENGINE.pid == os.getpid():
        return _ENGINE
    lib, data_path = _load_library()
    _declare_signatures(lib)
    # `path` is the directory that *contains* espeak-ng-data.
    parent = str(Path(data_path).parent).encode()
    sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, parent, _INITIALIZE_DONT_EXIT)
    if sample_rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed (returned {sample_rate}) with data path {data_path}")
    engine = _Engine(lib=lib, sample_rate=sample_rate, pid=os.getpid())

    def _on_samples(wav: ctypes.POINTER(ctypes.c_short), n: int, _events: int) -> int:
        if wav and n > 0:
            engine.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    engine.callback = _CALLBACK_TYPE(_on_samples)
    lib.espeak_SetSynthCallback(engine.callback)
    logger.debug("espeak-ng initialised at %d Hz from %s", sample_rate, data_path)
    _ENGINE = engine
    return engine


def _check(code: int, what: str) -> None:
    if code != _EE_OK:
        raise RuntimeError(f"espeak-ng {what} failed with error code {code}")


def synthesize(text: str, voice: str = "en", rate: int = 175, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Speak `text`; return (float32 mono waveform in [-1, 1], sample rate).

    `voice` is an espeak-ng voice name, optionally with a variant (see `VOICES`, which give the
    same samples for the same arguments whatever ran before), `rate` is in words per minute
    (80-450) and `pitch` in 0-100.
    """
    if not text.strip():
        raise ValueError("synthesize() needs non-empty text")
    with _LOCK:
        engine = _engine()
        lib = engine.lib
        code = lib.espeak_SetVoiceByName(voice.encode())
        if code == _EE_NOT_FOUND:
            raise ValueError(f"espeak-ng voice {voice!r} not found; use e.g. one of {VOICES}")
        _check(code, f"SetVoiceByName({voice!r})")
        _check(
            lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0),
            f"SetParameter(rate={rate})",
        )
        _check(
            lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0),
            f"SetParameter(pitch={pitch})",
        )
        _check(lib.espeak_SetParameter(_PARAM_VOLUME, 100, 0), "SetParameter(volume=100)")
        if hasattr(lib, "espeak_ng_SetRandSeed"):
            lib.espeak_ng_SetRandSeed(_RAND_SEED)  # breathiness noise is drawn from this
        engine.chunks.clear()
        data = text.encode("utf-8") + b"\0"
        flags = _CHARS_UTF8
        _check(
            lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, flags, None, None),
            f"Synth({text[:40]!r})",
        )
        _check(lib.espeak_Synchronize(), "Synchronize")
        chunks, engine.chunks = engine.chunks, []
    if not chunks:
        raise RuntimeError(f"espeak-ng produced no audio for {text[:40]!r} (voice {voice!r})")
    samples = np.concatenate(chunks).astype(np.float32) / 32768.0
    return samples, engine.sample_rate

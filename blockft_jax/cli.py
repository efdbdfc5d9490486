"""What the commands share at the edge: mistakes a user can fix become one line on stderr
(`error: ...`, exit status 2) -- a misspelt config key with the closest valid one, a value of the
wrong type, a missing or broken config file, an unknown flag -- and the console stays quiet:
the time and the message, no logger prefixes, no other library's notices unless --verbosity
asks for them."""
from __future__ import annotations

import argparse
import difflib
import glob
import importlib.util
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

USAGE_ERROR = 2
HELP = ("-h", "--help", "-?", "--helpshort")


def fail(message: str) -> NoReturn:
    """Ends the command with one line saying what was wrong and what to do."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


# --- the console -------------------------------------------------------------------------------

class ConsoleFormat(logging.Formatter):
    """`12:03:04 message`; warnings say so; errors are their message alone (`error: ...`)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return message
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {message}"


def setup_logging(verbosity: int | None = None) -> None:
    """Our progress at INFO on stderr; other libraries (JAX's backend probe, orbax, TensorFlow)
    only from WARNING, unless `verbosity` (absl's --verbosity, when given) asks for more."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # absl's prefixes every line; a library's
        if (type(handler).__name__ == "ABSLHandler" or getattr(handler, "_console", False)
                or _basic_stderr(handler)):
            root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console._console = True
    console.setFormatter(ConsoleFormat())
    root.addHandler(console)
    if verbosity is None:
        root.setLevel(logging.WARNING)
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ notices
        # oneDNN's notice is printed as TensorFlow loads, before it reads its log level (with
        # absl's "before absl::InitializeLog()" line) on CPUs with AVX-512: turn its kernels
        # off instead. TensorFlow only reads and decodes images here, never a oneDNN op.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        quiet_libtpu_without_a_tpu()
    else:
        from absl.logging import converter
        root.setLevel(converter.absl_to_standard(verbosity))
        logging.getLogger("absl").setLevel(converter.absl_to_standard(verbosity))
    logging.getLogger("blockft_jax").setLevel(min(logging.INFO, root.level))


def quiet_libtpu_without_a_tpu() -> None:
    """libtpu installed (`.[tpu]`, for --target) on a machine without TPUs: as JAX starts, it
    loads libtpu, which finds no TPU VM to describe and prints six lines of errors about it
    (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES) before JAX goes on with the CPU. Naming a
    one-host slice silences them (what it names is never used: there is no TPU, and --target
    compiles for the slice it names). Left alone wherever a TPU may be attached: any device of
    Google's on the PCI bus, or a TPU's device files."""
    if importlib.util.find_spec("libtpu") is None or _tpu_may_be_attached():
        return
    for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v4-8"),
                        ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0")):
        os.environ.setdefault(name, value)


def _tpu_may_be_attached() -> bool:
    def vendor(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return "unreadable"  # then assume the worst: it may be a TPU
    google = any(vendor(path) in ("0x1ae0", "unreadable")  # Google's PCI vendor id
                 for path in glob.glob("/sys/bus/pci/devices/*/vendor"))
    return google or bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _basic_stderr(handler: logging.Handler) -> bool:
    """The handler `logging.basicConfig()` installs (orbax calls it as it is imported): it
    would print each of our lines a second time, in its own format."""
    formatter = handler.formatter
    return (type(handler) is logging.StreamHandler and handler.stream is sys.stderr
            and (formatter is None or formatter._fmt == logging.BASIC_FORMAT))


class _WithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, when it has one."""

    def _get_help_string(self, action):
        if action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return action.help
        return f"{action.help} (default: {action.default})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse for predict, export and report: --help shows every default, and a mistake is
    one line (argparse's own prints the usage first)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=_WithDefaults, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message}. {self.prog} --help lists the options.")


# --- main's flags: the config file and its overrides --------------------------------------------

def parse_main_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for main, with every mistake a user can make as one line."""
    from absl import app, flags
    from ml_collections import ConfigDict
    if any(arg in HELP for arg in argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    try:
        rest = flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        close = re.search(r"Did you mean: (\S+) ?\?", str(e))
        fail(f"unknown flag --{e.flagname}"
             f"{f'; did you mean --{close.group(1)}?' if close else '.'} {LISTS_FLAGS}")
    except Exception as e:  # the config file or an override, or another flag's value
        message = explain_config_error(argv, e)
        if message:
            fail(message)
        if type(e).__name__ == "FlagOrderError":  # an override before --config
            fail("put --config FILE first, then its overrides (--config.<key>=<value>).")
        if isinstance(e, flags.Error):
            fail(f"{first_line(e)}. {LISTS_FLAGS}")
        raise
    if not isinstance(flags.FLAGS.config, ConfigDict):  # the file failed to load (lazily)
        fail(explain_config_error(argv) or f"--config {flags.FLAGS['config'].value!r} could "
                                           "not be loaded.")
    if len(rest) > 1:
        fail(f"unexpected argument(s) {' '.join(rest[1:])}: config values are set with "
             f"--config.<key>=<value> (e.g. --config.train.epochs=5). {LISTS_FLAGS}")
    return rest


LISTS_FLAGS = "python -m blockft_jax.main --help lists the flags."


def explain_config_error(argv: list[str], error: BaseException | None = None) -> str | None:
    """The user's mistake in --config or its overrides, in one line, or None if there is
    none (then `error` was something else)."""
    path = _config_argument(argv)
    if path is None:
        return ("--config is required: the search's config file, e.g. --config "
                "configs/mobilenet_v2.py (configs/ has one per model, demo.py and photos.py).")
    config = load_config_file(path)
    if isinstance(config, str):
        return config
    for key in _override_keys(argv):
        if not has_key(config, key):
            return (f"--config.{key}: the config has no key {key!r}{closest_key(config, key)}; "
                    f"--show_config lists every key with its value.")
    # absl names the override whose value it could not read: say what the key takes.
    bad_value = re.match(r"flag --config\.([\w.]+)=(.*?): ", str(error or ""), re.S)
    if bad_value and has_key(config, bad_value.group(1)):
        from ml_collections.config_flags import config_path
        key, value = bad_value.groups()
        kind = config_path.get_type(key, config)
        return (f"--config.{key}={value}: {key} takes {_KINDS.get(kind, kind.__name__)} "
                f"(now {get_key(config, key)!r}).")
    return None


_KINDS = {int: "a whole number", float: "a number", bool: "True or False", str: "text",
          tuple: "a tuple, e.g. '(\"a\",\"b\")'"}


def load_config_file(path: str):
    """The ConfigDict a config file gives (`file.py` or `file.py:argument`, as ml_collections
    reads it), or a one-line message saying why there is none."""
    file, _, argument = path.partition(":")
    if not Path(file).is_file():
        beside = sorted(p.name for p in Path(file).parent.glob("*.py")
                        if not p.name.startswith("_")) if Path(file).parent.is_dir() else []
        hint = (f"; {Path(file).parent}/ has {', '.join(beside)}" if beside else
                "; run the command from the folder that holds configs/ (the repository root), "
                "or give the file's path")
        return f"--config {path}: no such file{hint}."
    try:
        spec = importlib.util.spec_from_file_location("blockft_jax_config_check", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            return f"--config {path}: the file has no get_config() function."
        config = module.get_config(*([argument] if argument else []))
    except Exception as e:  # the file's own error: say where, in one line
        line = next((f" (line {frame.lineno})" for frame in traceback.extract_tb(e.__traceback__)
                     if Path(frame.filename).resolve() == Path(file).resolve()), "")
        text = first_line(e)
        if isinstance(e, SyntaxError) and e.lineno:
            line, text = f" (line {e.lineno})", e.msg
        return f"--config {path} cannot be loaded{line}: {type(e).__name__}: {text}."
    from ml_collections import ConfigDict
    if not isinstance(config, ConfigDict):
        return f"--config {path}: get_config() returned {type(config).__name__}, not a ConfigDict."
    return config


def has_key(config, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def config_keys(config, prefix: str = "") -> list[str]:
    """Every key, dotted (`train.epochs`), sorted within each section; sections too."""
    keys = []
    for name in config.keys():
        value = config[name]
        keys.append(prefix + name)
        if hasattr(value, "keys"):
            keys += config_keys(value, f"{prefix}{name}.")
    return keys


def config_listing(config) -> str:
    """`key = value` for every key of the config (what --show_config prints)."""
    return "\n".join(f"{key} = {get_key(config, key)!r}" for key in config_keys(config)
                     if not hasattr(get_key(config, key), "keys"))


def get_key(config, key: str):
    """The value at a dotted key (`train.epochs`)."""
    for part in key.split("."):
        config = config[part]
    return config


def closest_key(config, key: str) -> str:
    keys = config_keys(config)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # the right name in the wrong section: --config.epochs -> train.epochs
        leaf = key.split(".")[-1]
        close = [k for k in keys if k.split(".")[-1] in
                 difflib.get_close_matches(leaf, [k.split(".")[-1] for k in keys], 1, 0.75)][:1]
    return f" (did you mean {close[0]}?)" if close else ""


def _config_argument(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _override_keys(argv: list[str]) -> list[str]:
    """The keys of every --config.<key>[=value] (and --noconfig.<key>)."""
    return [m.group(1) for m in (re.match(r"^--?(?:no)?config\.([^=]+)", arg) for arg in argv)
            if m]


def configs_importable(argv: list[str]) -> None:
    """Config files import their defaults as `configs.default`: make the folder that holds
    configs/ importable wherever the command runs from."""
    path = _config_argument(argv)
    if path:
        sys.path.insert(0, str(Path(path.partition(":")[0]).expanduser().absolute().parent.parent))


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0].rstrip(".") if text else type(error).__name__

"""Platform configuration: one pydantic model that every entry point reads.

Values come from the embedded defaults, then an optional YAML file (``RECSYS_CONFIG``), then environment
variables ``RECSYS_<FIELD>`` (nested with ``__``, e.g. ``RECSYS_KAFKA__BOOTSTRAP``). Unknown keys are an error, so
a typo never falls back silently to a default: :func:`load_config` raises a :class:`ConfigError` that names the
variable or the file (and the key's line) and suggests the closest valid key. A variable whose first segment is no
key at all (``RECSYS_HOME``) belongs to something else: it is ignored with a warning. ``python -m features.config
show`` prints every value and where it came from (``default``, ``file <path>``, ``env RECSYS_...``).

>>> cfg = PlatformConfig()
>>> cfg.kafka.topic
'interactions'
>>> PlatformConfig.model_validate({"kafak": {}})
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for PlatformConfig
kafak
  Extra inputs are not permitted [type=extra_forbidden, input_value={}, input_type=dict]
    For further information visit https://errors.pydantic.dev/.../v/extra_forbidden
>>> try:
...     load_config(environ={"RECSYS_TRAIN__NUM_WORKRS": "2"})
... except ConfigError as e:  # message: "<source>: <problem>; <fix>"
...     print(e.source, e.problem, e.fix, sep="\\n")
environment variable RECSYS_TRAIN__NUM_WORKRS
unknown key 'num_workrs' in section 'train'
did you mean RECSYS_TRAIN__NUM_WORKERS?
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from features.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaConfig(_Strict):
    bootstrap: str = "127.0.0.1:9092"
    topic: str = "interactions"
    partitions: int = Field(4, ge=1)


class SparkConfig(_Strict):
    master: str = "local[2]"
    shuffle_partitions: int = Field(4, ge=1)
    driver_memory: str = "2g"


class TrainConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    #: Logical CPUs given to the local Ray cluster; more than the workers take, so Ray Data's read tasks can run.
    ray_cpus: int = Field(4, ge=1)
    use_gpu: bool = False
    ray_address: str | None = None


class ModelsConfig(_Strict):
    """The registered models (``training.registry``) the service and the publish gate use unless told otherwise:
    ``retrieval`` gives candidates and similar items (a model with an item table; the one the gate publishes),
    ``ranker`` orders the candidates of /recommend; ``demo``: the models ``make demo`` trains (``make lineage``
    trains every registered model)."""

    retrieval: str = "item2vec"
    ranker: str = "deepfm"
    demo: tuple[str, ...] = ("deepfm", "din", "item2vec", "mf", "wide_deep")


class ServingConfig(_Strict):
    """The HTTP service (``serving.app``). With an admin token, ``POST /admin/reload`` requires the header
    ``Authorization: Bearer <token>``; without one, the service refuses to bind beyond loopback. Set at most one
    of ``admin_token`` (``RECSYS_SERVING__ADMIN_TOKEN``) and ``admin_token_file`` (a file whose stripped content is
    the token, read when the service starts: ``serving.app.resolve_admin_token``). The token never prints:

    >>> ServingConfig(admin_token="s3cret")
    ServingConfig(admin_token=SecretStr('**********'), admin_token_file=None)
    """

    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None


class PlatformConfig(_Strict):
    #: Where the lake and checkpoints live (git-ignored).
    data_dir: Path = ROOT / "data"
    #: Where downloaded data sets live; separate from data_dir so a scratch lake reuses the fetched data.
    raw_dir: Path = ROOT / "data" / "raw"
    #: The data source: a YAML file declaring the interaction log and side tables (features.source).
    source: Path = ROOT / "features" / "sources" / "movielens-100k.yaml"
    artifacts_dir: Path = ROOT / "artifacts"
    #: Name of this run: its outputs go to ``artifacts_dir / run_name``.
    run_name: str = "demo"
    kafka: KafkaConfig = KafkaConfig()
    spark: SparkConfig = SparkConfig()
    train: TrainConfig = TrainConfig()
    models: ModelsConfig = ModelsConfig()
    serving: ServingConfig = ServingConfig()

    @property
    def lake_dir(self) -> Path:
        return self.data_dir / "lake"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def run_dir(self) -> Path:
        """Outputs of this run: ``stages/`` (one result JSON per stage), ``models/``, ``embeddings/``,
        ``summary.json``."""
        return self.artifacts_dir / self.run_name


#: The prefix of every configuration variable; ``RECSYS_CONFIG`` names the YAML file and is not a key.
ENV_PREFIX = "RECSYS_"
CONFIG_FILE_VAR = "RECSYS_CONFIG"

Key = tuple[str, ...]  # a key's path from the top, e.g. ("train", "num_workers")


@dataclass(frozen=True)
class ResolvedConfig:
    """The configuration and where each value came from (:func:`resolve_config`).

    Attributes:
        config: the validated configuration.
        sources: {dotted leaf key: ``default``, ``file <path>`` or ``env RECSYS_...``}, every leaf in declaration
            order.
        ignored: ``RECSYS_*`` variables that name no configuration key (``RECSYS_HOME``), left out with a warning.
    """

    config: PlatformConfig
    sources: dict[str, str]
    ignored: tuple[str, ...] = ()


def _section(path: Key) -> type[BaseModel] | None:
    """The model of the section at ``path`` (``()``: PlatformConfig); None when ``path`` is a value or unknown."""
    model: type[BaseModel] = PlatformConfig
    for key in path:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _leaves(model: type[BaseModel] = PlatformConfig, prefix: Key = ()) -> list[Key]:
    """Every value's key path, in declaration order."""
    out: list[Key] = []
    for name in model.model_fields:
        sub = _section((*prefix, name))
        out.extend(_leaves(sub, (*prefix, name)) if sub is not None else [(*prefix, name)])
    return out


def _env_name(path: Key) -> str:
    return ENV_PREFIX + "__".join(path).upper()


def _dotted(path: Key) -> str:
    return ".".join(map(str, path))


def closest(word: str, valid: list[str]) -> str | None:
    """The entry of ``valid`` nearest to ``word`` (a misspelt key), or None when none is near."""
    found = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    return found[0] if found else None


def _type_name(annotation: object) -> str:
    """``int``, ``str | None``, ``tuple[str, ...]``: the type a value must have, as a user reads it."""
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return re.sub(r"\b(?:typing|pathlib|pydantic\.types|pydantic)\.", "", str(annotation))


def _lookup(data: object, path: Key) -> tuple[bool, object]:
    """(found, value) of ``path`` in nested dicts."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return False, None
        data = data[key]
    return True, data


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


_warned: set[str] = set()


def _warn_ignored(name: str) -> None:
    """Log once per process that ``name`` is not a configuration variable."""
    if name in _warned:
        return
    _warned.add(name)
    first = name[len(ENV_PREFIX):].split("__")[0].lower()
    guess = closest(first, list(PlatformConfig.model_fields))
    hint = f"; did you mean {_env_name((guess,))}?" if guess else ""
    log.warning("ignoring %s: %r is not a configuration key (top-level keys: %s)%s", name, first,
                ", ".join(PlatformConfig.model_fields), hint)


def _env_key_error(name: str, path: Key) -> ConfigError | None:
    """The error of a variable whose first segment is a key but whose path is not a value, else None."""
    source = f"environment variable {name}"
    for i, key in enumerate(path):
        model = _section(path[:i])
        if model is None:
            return ConfigError(source, f"{_dotted(path[:i])} is a single value, not a section",
                               f"set {_env_name(path[:i])} instead")
        if key not in model.model_fields:
            guess = closest(key, list(model.model_fields))
            fix = (f"did you mean {_env_name((*path[:i], guess))}?" if guess else
                   "valid variables there: " + ", ".join(_env_name((*path[:i], k)) for k in model.model_fields))
            return ConfigError(source, f"unknown key {key!r} in section {_dotted(path[:i])!r}", fix)
    model = _section(path)
    if model is not None:
        return ConfigError(source, f"{_dotted(path)} is a section, not a single value",
                           "set its keys one by one: " + ", ".join(_env_name((*path, k)) for k in model.model_fields))
    return None


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict, dict[Key, str], tuple[str, ...], list[ConfigError]]:
    """Read the ``RECSYS_*`` variables: (nested values, {key path: variable}, ignored variables, errors).

    A variable whose first segment is no top-level key is ignored with a warning; one under a known key that
    names no value is an error."""
    data: dict = {}
    origin: dict[Key, str] = {}
    ignored: list[str] = []
    errors: list[ConfigError] = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_FILE_VAR:
            continue
        path = tuple(name[len(ENV_PREFIX):].lower().split("__"))
        if path[0] not in PlatformConfig.model_fields:
            ignored.append(name)
            _warn_ignored(name)
            continue
        error = _env_key_error(name, path)
        if error is not None:
            errors.append(error)
            continue
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = environ[name]
        origin[path] = name
    return data, origin, tuple(ignored), errors


def _yaml_line(text: str, path: Key) -> int | None:
    """The 1-based line of the deepest key of ``path`` found in the YAML ``text``; None when not even the first."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for key in path:
        pairs = node.value if isinstance(node, yaml.MappingNode) else []
        found = next(((k, v) for k, v in pairs if isinstance(k, yaml.ScalarNode) and k.value == str(key)), None)
        if found is None:
            break
        line, node = found[0].start_mark.line + 1, found[1]
    return line


def _kind(value: object) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}")


def _read_yaml(path: Path, label: str, named_by_env: bool) -> tuple[dict, str]:
    """(mapping, text) of the YAML file.

    Raises:
        ConfigError: missing, unreadable, not YAML, or not a mapping at the top.
    """
    where = f"set {CONFIG_FILE_VAR} to an existing YAML file, or unset it to use the defaults" if named_by_env \
        else "pass an existing YAML file"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(label, "no such file", where) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(label, f"cannot be read ({e})", where) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(label + at, f"is not valid YAML ({getattr(e, 'problem', None) or e})",
                          "fix the syntax (keys and values as 'key: value', nested keys indented)") from None
    if data is None:
        return {}, text
    if not isinstance(data, dict):
        raise ConfigError(label, f"holds {_kind(data)}, not a mapping of configuration keys",
                          "write 'key: value' lines at the top level (e.g. 'kafka:' then '  topic: clicks'); "
                          "top-level keys: " + ", ".join(PlatformConfig.model_fields))
    return data, text


def _explain(err: dict, merged: dict, origin: dict[Key, str], file_data: dict, file_label: str,
             file_text: str) -> ConfigError:
    """One pydantic error as a ConfigError naming where the value came from."""
    loc = tuple(err["loc"])
    if err["type"] in ("extra_forbidden", "invalid_key"):   # only the file can hold these (variables are checked)
        parent, key = loc[:-1], loc[-1]
        line = _yaml_line(file_text, loc)
        source = (file_label or "the configuration") + (f", line {line}" if line else "")
        valid = list((_section(parent) or PlatformConfig).model_fields)
        section = f"in section {_dotted(parent)!r}" if parent else "at the top level"
        guess = closest(str(key), valid)
        fix = (f"did you mean {_dotted((*parent, guess))!r}?" if guess
               else f"valid keys {section}: {', '.join(valid)}")
        return ConfigError(source, f"unknown key {str(key)!r} {section}", fix)
    path: Key = ()
    for key in loc:  # the longest prefix of loc that names keys (pydantic appends list indices, union members)
        model = _section(path)
        if model is None or not isinstance(key, str) or key not in model.model_fields:
            break
        path = (*path, key)
    env = sorted(name for p, name in origin.items() if p[:len(path)] == path)
    in_file, _ = _lookup(file_data, path)
    sources = [f"environment variable {name}" for name in env]
    if in_file and not (env and origin.get(path)):
        line = _yaml_line(file_text, path)
        sources.append(file_label + (f", line {line}" if line else ""))
    source = " and ".join(sources) or "the configuration"
    _, value = _lookup(merged, path)
    model = _section(path)
    if model is not None and err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return ConfigError(source, f"{_dotted(path) or 'the configuration'} must be a mapping of its keys, not "
                           f"{_kind(value)}", "its keys: " + ", ".join(model.model_fields))
    if model is not None:  # a check across the section's keys
        return ConfigError(source, f"section {_dotted(path) or 'top level'!r}: {err['msg']}",
                           "change the values it names")
    field = _section(path[:-1]).model_fields[path[-1]]
    expected = _type_name(field.annotation)
    shown = "'**********'" if "SecretStr" in expected else repr(value)
    return ConfigError(source, f"{_dotted(path)} = {shown} is not valid: {err['msg']}",
                       f"give {_dotted(path)} a value of type {expected}")


def resolve_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> ResolvedConfig:
    """Read the configuration and note where each value came from: defaults, then the YAML file (``path``, else
    ``$RECSYS_CONFIG``), then ``RECSYS_*`` variables.

    Args:
        path: YAML file; None: the one ``RECSYS_CONFIG`` names, if any.
        environ: the variables to read (None: ``os.environ``).

    Raises:
        ConfigError: the file is missing, unreadable, not YAML or not a mapping; a key in the file is unknown; a
            variable under a known section names no key; a value has the wrong type. The message names the variable
            or the file (and the key's line) and suggests the closest valid key. All problems found are reported.
    """
    environ = os.environ if environ is None else environ
    named_by_env = path is None and bool(environ.get(CONFIG_FILE_VAR))
    file = Path(path) if path else Path(environ[CONFIG_FILE_VAR]) if named_by_env else None
    file_data: dict = {}
    file_text = ""
    file_label = ""
    if file is not None:
        file_label = f"configuration file {file}" + (f" ({CONFIG_FILE_VAR})" if named_by_env else "")
        file_data, file_text = _read_yaml(file, file_label, named_by_env)
    env_data, origin, ignored, errors = _env_overrides(environ)
    merged = _merge(file_data, env_data)
    try:
        config = PlatformConfig.model_validate(merged)
    except ValidationError as e:
        errors += [_explain(err, merged, origin, file_data, file_label, file_text) for err in e.errors()]
    if errors:
        raise ConfigError(errors[0].source, errors[0].problem, errors[0].fix, also=tuple(errors[1:]))
    sources = {}
    for leaf in _leaves():
        in_file, _ = _lookup(file_data, leaf)
        sources[_dotted(leaf)] = (f"env {origin[leaf]}" if leaf in origin else f"file {file}" if in_file
                                  else "default")
    return ResolvedConfig(config, sources, ignored)


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> PlatformConfig:
    """Read the configuration: defaults, then YAML (``path`` or ``$RECSYS_CONFIG``), then ``RECSYS_*`` variables
    (``environ``, default ``os.environ``). A variable whose first segment is no key (``RECSYS_HOME``) is ignored
    with a warning.

    >>> load_config(environ={"RECSYS_TRAIN__NUM_WORKERS": "3"}).train.num_workers
    3

    Raises:
        ConfigError: see :func:`resolve_config`.
    """
    return resolve_config(path, environ).config


# ------------------------------------------------------------------------------------------ command lines
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of the platform's command lines: description and epilog as written, and each option's default
    appended to its help unless the help states one (or the default is None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None
                or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def describe(doc: str | None, width: int = 100) -> str:
    """A command's description: the first paragraph of a module docstring as whole sentences, reST markup removed,
    wrapped to ``width`` characters.

    >>> print(describe('''Stage ``x``: does one thing, described over
    ... two lines.
    ...
    ... More detail.'''))
    Stage x: does one thing, described over two lines.
    """
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
    return textwrap.fill(text, width)


def settings_help(settings: Mapping[str, str]) -> str:
    """The epilog of a command's help: each configuration key it reads, with its variable, meaning (and unit) and
    default.

    Args:
        settings: {dotted key: what it is, with its unit}.

    >>> print(settings_help({"kafka.partitions": "partitions of a new topic (count)"}))
    configuration (RECSYS_* variables over the YAML file of RECSYS_CONFIG; python -m features.config show):
      RECSYS_KAFKA__PARTITIONS  partitions of a new topic (count) (default: 4)

    Raises:
        KeyError: a key that is not in the configuration.
    """
    defaults = PlatformConfig().model_dump(mode="json")
    paths = [tuple(dotted.split(".")) for dotted in settings]
    for path in paths:
        if not _lookup(defaults, path)[0] or _section(path) is not None:
            raise KeyError(f"{_dotted(path)!r} is not a configuration value")
    width = max((len(_env_name(path)) for path in paths), default=0)
    return "\n".join([f"configuration ({ENV_PREFIX}* variables over the YAML file of {CONFIG_FILE_VAR}; "
                      "python -m features.config show):",
                      *(f"  {_env_name(path):<{width}}  {meaning} (default: {_yaml_value(_lookup(defaults, path)[1])})"
                        for path, meaning in zip(paths, settings.values()))])


def load_config_or_exit(prog: str, path: str | Path | None = None) -> PlatformConfig:
    """:func:`load_config` for a command line's ``main``: a :class:`ConfigError` is printed on stderr as
    ``<prog>: configuration error: <message>`` and the process exits with status 2 (argparse's usage error),
    without a traceback.

    Raises:
        SystemExit: status 2, the configuration cannot be read.
    """
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"{prog}: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _yaml_value(value: object) -> str:
    """A value as one line of YAML: ``interactions``, ``4``, ``null``, ``[deepfm, din]``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, sort_keys=False).strip()
    return text[:-len("\n...")] if text.endswith("\n...") else text


def format_config(resolved: ResolvedConfig) -> str:
    """The active configuration, one ``key: value  # source`` line per value (source: ``default``, ``file
    <path>`` or ``env RECSYS_...``); secrets print as ``**********``; ignored variables are listed at the end.

    >>> lines = format_config(resolve_config(environ={"RECSYS_KAFKA__TOPIC": "clicks", "RECSYS_HOME": "/h"}))
    >>> print("\\n".join(line for line in lines.splitlines() if line.startswith(("kafka.", "#"))))
    kafka.bootstrap: 127.0.0.1:9092       # default
    kafka.topic: clicks                   # env RECSYS_KAFKA__TOPIC
    kafka.partitions: 4                   # default
    # ignored: RECSYS_HOME (not a configuration key)
    """
    values = resolved.config.model_dump(mode="json")
    lines = [f"{dotted}: {_yaml_value(_lookup(values, tuple(dotted.split('.')))[1])}"
             for dotted in resolved.sources]
    out = [f"{line:<36}  # {source}" for line, source in zip(lines, resolved.sources.values())]  # aligned
    out += [f"# ignored: {name} (not a configuration key)" for name in resolved.ignored]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m features.config show``: print the active configuration and where each value came from.

    Returns:
        The exit status: 0, or 2 when the configuration cannot be read (the message on stderr).
    """
    parser = argparse.ArgumentParser(prog="python -m features.config", formatter_class=HelpFormatter,
                                     description=describe(__doc__))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    show = commands.add_parser("show", formatter_class=HelpFormatter,
                               help="print every configuration value with its source (default, file or env)",
                               description=describe("Print the active configuration, one 'key: value  # source' "
                                                    "line per value; source: default, file <path> or env "
                                                    "RECSYS_..."))
    show.add_argument("--config", type=Path, default=None,
                      help=f"YAML file to read (default: the one {CONFIG_FILE_VAR} names, if any)")
    args = parser.parse_args(argv)
    try:
        resolved = resolve_config(args.config)
    except ConfigError as e:
        print(f"{parser.prog}: configuration error: {e}", file=sys.stderr)
        return 2
    print(format_config(resolved))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

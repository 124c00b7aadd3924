"""attnhub/registry.py: the built-in registry.yaml, malformed entries, the ATTNHUB_REGISTRY overlay,
run-time registration and entry-point plug-ins.

A malformed entry must fail at load with a `RegistryError` naming the source (file or entry point), the backend
and the field.
"""

from __future__ import annotations

import importlib
import re
import sys
import textwrap

import pytest
import torch

import attnhub
from attnhub import registry
from attnhub.registry import Registry, RegistryError

BUILTIN = {"triton_fa_rope", "torch_sdpa", "math"}


def _write(tmp_path, text: str, name: str = "reg.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _qkv(dtype=torch.float32, B=1, H=2, N=5, D=16, seed=0):
    """q, k, v: [B, H, N, D], fresh random."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3)]


# ------------------------------------------------------------------------------------------------ built-in file
def test_builtin_registry_has_the_three_backends(monkeypatch):
    monkeypatch.delenv("ATTNHUB_REGISTRY", raising=False)
    reg = registry._build_default()
    specs = reg.specs()
    assert BUILTIN <= set(specs), sorted(specs)
    assert specs["triton_fa_rope"].priority > specs["torch_sdpa"].priority > specs["math"].priority
    for name in BUILTIN:
        assert specs[name].source.endswith("registry.yaml"), specs[name].source
        assert callable(reg.entry(name)), name
    assert torch.float64 in specs["math"].dtypes and torch.float64 not in specs["triton_fa_rope"].dtypes
    assert set(attnhub.REGISTRY.specs()) >= BUILTIN


NEW_CAPABILITIES = ("key_padding", "gqa", "rope_batched", "rope_coords")


def test_new_capabilities_default_to_false_and_are_declared_by_the_builtins():
    """Issue 12's vocabulary: every built-in backend implements it; a backend registered without the fields is never
    handed such a call."""
    specs = registry._build_default().specs()
    for field in NEW_CAPABILITIES:
        for name in ("math", "torch_sdpa", "triton_rope_sdpa", "triton_fa_rope"):
            assert getattr(specs[name], field), (name, field)
    attnhub.register_backend("toy", lambda q, k, v, rope, scale: q, priority=1)
    assert not any(getattr(attnhub.REGISTRY.specs()["toy"], f) for f in NEW_CAPABILITIES)
    with pytest.raises(RegistryError, match=r"'toy'\.gqa: expected true or false, got 'yes'"):
        attnhub.register_backend("toy", lambda q, k, v, rope, scale: q, priority=1, gqa="yes")


# ------------------------------------------------------------------------------------------- malformed entries
GOOD = """\
    backends:
      toy:
        impl: mod:fn
        priority: 5
{extra}"""

MALFORMED = {
    # case id: (entry lines below `toy:`, field named in the error, words of the error)
    "unknown_field": ("impl: mod:fn\npriority: 5\nspeed: fast", "speed", "unknown field"),
    "priority_str": ("impl: mod:fn\npriority: high", "priority", "expected an integer"),
    "priority_bool": ("impl: mod:fn\npriority: true", "priority", "expected an integer"),
    "missing_impl": ("priority: 5", "impl", "missing required field"),
    "missing_priority": ("impl: mod:fn", "priority", "missing required field"),
    "impl_no_colon": ("impl: modfn\npriority: 5", "impl", "module:function"),
    "bad_dtype": ("impl: mod:fn\npriority: 5\ndtypes: [float32, half]", "dtypes", "unknown dtype"),
    "dtypes_not_list": ("impl: mod:fn\npriority: 5\ndtypes: float32", "dtypes", "list of strings"),
    "bad_layout": ("impl: mod:fn\npriority: 5\nrope_layouts: [none, diagonal]", "rope_layouts", "unknown RoPE layout"),
    "bool_as_str": ("impl: mod:fn\npriority: 5\nbackward: 'yes'", "backward", "true or false"),
    "head_dim_key": ("impl: mod:fn\npriority: 5\nhead_dim: {multiple: 8}", "head_dim", "unknown key"),
    "head_dim_negative": ("impl: mod:fn\npriority: 5\nhead_dim: {min: -1}", "head_dim.min", "non-negative"),
    "max_seq_len_float": ("impl: mod:fn\npriority: 5\nmax_seq_len: 1.5", "max_seq_len", "non-negative integer"),
    "cc_str": ("impl: mod:fn\npriority: 5\nmin_compute_capability: ampere", "min_compute_capability", "a number"),
}


def _entry(lines: str) -> str:
    body = textwrap.indent(lines, " " * 4)
    return f"backends:\n  toy:\n{body}\n"


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_entry_names_file_backend_and_field(tmp_path, case):
    lines, field, words = MALFORMED[case]
    path = _write(tmp_path, _entry(lines))
    with pytest.raises(RegistryError, match=re.escape(words)) as err:
        Registry().load_file(path)
    msg = str(err.value)
    assert path in msg and "'toy'" in msg and field in msg, msg


@pytest.mark.parametrize(
    "text, words",
    [
        ("backends:\n  toy: [impl, priority\n", "not valid YAML"),  # unclosed flow sequence
        ("backends:\n  toy:\n    impl: a:b\n   priority: 1\n", "not valid YAML"),  # bad indentation
        ("backends:\n  toy: {impl: 'a:b', priority: 1}\n  toy: {impl: 'c:d', priority: 2}\n", "duplicate key 'toy'"),
        ("- toy\n", "single key 'backends'"),
        ("backend:\n  toy: {impl: 'a:b', priority: 1}\n", "single key 'backends'"),
        ("", "single key 'backends'"),
        ("backends:\n  toy: 5\n", "expected a mapping of fields"),
        ("backends:\n  my-toy: {impl: 'a:b', priority: 1}\n", "must be an identifier"),
    ],
    ids=["syntax", "indent", "duplicate", "list", "typo_top_key", "empty", "entry_not_mapping", "bad_name"],
)
def test_malformed_document_names_file(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(RegistryError, match=re.escape(words)) as err:
        Registry().load_file(path)
    assert path in str(err.value)


def test_malformed_overlay_fails_at_default_build(tmp_path, monkeypatch):
    """ATTNHUB_REGISTRY is read when the default registry is built: a bad field there fails loudly, named."""
    path = _write(tmp_path, "backends:\n  torch_sdpa:\n    dtypes: [float32, float8]\n")
    monkeypatch.setenv("ATTNHUB_REGISTRY", path)
    with pytest.raises(RegistryError, match=r"float8") as err:
        registry._build_default()
    assert path in str(err.value) and "'torch_sdpa'" in str(err.value) and "dtypes" in str(err.value)


@pytest.mark.parametrize("fields,field", [
    ("head_dim: {max: 512}", "head_dim.max: 512"),
    ("head_dim: {multiple_of: 2, min: 16}", "head_dim.max: None"),
])
def test_overlay_beyond_the_backends_limits_fails_at_load(tmp_path, monkeypatch, fields, field):
    """triton_fa_rope's configs cover head dims up to 256 (`limits:` in registry.yaml): an overlay that allows more
    (or drops the bound) is a RegistryError at load naming the file, the backend and the field, not a failure at
    the first call."""
    path = _write(tmp_path, f"backends:\n  triton_fa_rope:\n    {fields}\n")
    monkeypatch.setenv("ATTNHUB_REGISTRY", path)
    with pytest.raises(RegistryError, match=re.escape(field) + ".*allows more than its code covers") as err:
        registry._build_default()
    assert path in str(err.value) and "'triton_fa_rope'" in str(err.value)


@pytest.mark.parametrize("limits,words", [
    ("attnhub.rope:NONESUCH", "could not load 'attnhub.rope:NONESUCH'"),
    ("attnhub.rope", "expected 'module:attribute'"),
])
def test_malformed_limits_field_is_named(tmp_path, limits, words):
    path = _write(tmp_path, f"backends:\n  toy: {{impl: 'a:b', priority: 1, limits: '{limits}'}}\n")
    with pytest.raises(RegistryError, match=re.escape(words)) as err:
        Registry().load_file(path)
    assert path in str(err.value) and "'toy'" in str(err.value) and "limits" in str(err.value)


def test_limits_are_checked_for_runtime_registration():
    with pytest.raises(RegistryError, match=r"head_dim.max: 300 allows more"):
        attnhub.register_backend("toy", lambda *a: None, priority=1, head_dim={"max": 300},
                                 limits="attnhub.backends.triton_fa_rope.configs:LIMITS")


# ------------------------------------------------------------------------------------------------------ overlay
def test_overlay_adds_a_backend_and_overrides_a_priority(tmp_path, monkeypatch):
    path = _write(
        tmp_path,
        """\
        backends:
          math:
            priority: 500
          extra:
            impl: attnhub.backends.math:attention
            priority: 7
            devices: [cpu]
            dtypes: [float64]
        """,
    )
    monkeypatch.setenv("ATTNHUB_REGISTRY", path)
    reg = registry._build_default()
    specs = reg.specs()
    assert BUILTIN | {"extra"} <= set(specs)
    assert specs["math"].priority == 500
    # the overlay changes only the fields it names
    assert specs["math"].dtypes == attnhub.REGISTRY.specs()["math"].dtypes
    assert specs["math"].description == attnhub.REGISTRY.specs()["math"].description
    assert path in specs["math"].source and path == specs["extra"].source
    assert specs["extra"].dtypes == (torch.float64,)

    # the process-wide registry with that overlay applied: math (now priority 500) wins on CPU
    attnhub.REGISTRY.restore(specs)
    q, k, v = _qkv()
    assert attnhub.explain(q, k, v).chosen == "math"


# ---------------------------------------------------------------------------------------- run-time registration
@pytest.mark.parametrize(
    "constraint, words",
    [(dict(max_heads=8), "unknown field(s) ['max_heads']"),
     (dict(dtypes=["int8"]), "'toy'.dtypes: unknown dtype(s) ['int8']")],
    ids=["unknown_constraint", "bad_value"],
)
def test_register_backend_malformed_constraint_is_named(constraint, words):
    with pytest.raises(RegistryError, match=re.escape(words)) as err:
        attnhub.register_backend("toy", lambda q, k, v, rope, scale: q, priority=1, **constraint)
    assert "'toy'" in str(err.value) and "register_backend()" in str(err.value)
    assert "toy" not in attnhub.REGISTRY.specs()


def test_register_backend_bumps_version():
    before = attnhub.REGISTRY.version
    attnhub.register_backend("toy", lambda q, k, v, rope, scale: q, priority=-1)
    assert attnhub.REGISTRY.version > before
    assert attnhub.REGISTRY.specs()["toy"].source == "register_backend()"


# ------------------------------------------------------------------------------------------------- entry points
PLUGIN = '''\
"""A third-party attnhub plug-in, installed through a dist-info on sys.path."""
import torch

CALLS = []


def attention(q, k, v, rope, scale):
    CALLS.append(q.shape)
    from attnhub.backends.math import attention as ref
    return ref(q, k, v, rope, scale)


def backends():
    return {{"{name}": {{"impl": "{module}:attention", "priority": 1000, "devices": ["cpu"], "dtypes": ["float32"],
                        "description": "toy plug-in"}}}}


BACKENDS = backends()
BAD = {{"{name}_bad": {{"impl": "{module}:attention", "priority": "high"}}}}
NOT_A_MAPPING = ["{name}"]
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A distribution `attnhub-toy-plugin` with entry points in group `attnhub.backends`, found on sys.path.

    Yields (module name, backend name, function that sets the entry-point lines).
    """
    module, name = f"attnhub_toy_plugin_{tmp_path.name}".replace("-", "_"), "toy_plugin"
    module = re.sub(r"\W", "_", module)
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(name=name, module=module))
    dist = tmp_path / "attnhub_toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: attnhub-toy-plugin\nVersion: 0.1\n")

    def entry_points(*lines: str) -> None:
        (dist / "entry_points.txt").write_text("[attnhub.backends]\n" + "\n".join(lines) + "\n")
        importlib.invalidate_caches()

    entry_points(f"toy = {module}:backends")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module, name, entry_points
    sys.modules.pop(module, None)


def test_entry_point_backend_is_loaded_selected_and_explained(plugin, monkeypatch):
    module, name, _ = plugin
    monkeypatch.delenv("ATTNHUB_REGISTRY", raising=False)
    specs = registry._build_default().specs()  # what `import attnhub` would build in this environment
    assert name in specs and BUILTIN <= set(specs)
    assert specs[name].source == f"entry point 'toy' ({module}:backends)"

    registry._load_entry_points(attnhub.REGISTRY)
    q, k, v = _qkv(torch.float32)
    why = attnhub.explain(q, k, v)
    assert why.chosen == name and f"chosen: {name} (highest priority)" in str(why)
    calls = importlib.import_module(module).CALLS
    o = attnhub.attention(q, k, v)
    assert len(calls) == 1
    torch.testing.assert_close(o, attnhub.attention(q, k, v, backend="math"), rtol=0, atol=0)

    # its constraints hold: float64 is not in its dtypes
    why64 = attnhub.explain(*(t.double() for t in (q, k, v)))
    assert why64.chosen == "torch_sdpa" and "dtype float64 not in [float32]" in str(why64)


def test_entry_point_may_name_a_plain_mapping(plugin):
    module, name, entry_points = plugin
    entry_points(f"toy_map = {module}:BACKENDS")
    reg = Registry()
    registry._load_entry_points(reg)
    assert name in reg.specs()


@pytest.mark.parametrize(
    "target, words",
    [("BAD", "'toy_plugin_bad'.priority: expected an integer"), ("NOT_A_MAPPING", "expected a mapping"),
     ("missing_attr", "could not load")],
)
def test_malformed_entry_point_is_named(plugin, target, words):
    module, _, entry_points = plugin
    entry_points(f"broken = {module}:{target}")
    with pytest.raises(RegistryError, match=re.escape(words)) as err:
        registry._load_entry_points(Registry())
    assert f"entry point 'broken' ({module}:{target})" in str(err.value)

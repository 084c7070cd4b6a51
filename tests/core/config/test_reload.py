"""ConfigWatcher: mtime + content-hash change detection, re-validation, immutable swap, recompile flag."""

import os

from usp_core.config.loader import PredictorConfig
from usp_core.config.mutation import atomic_write_config
from usp_core.config.reload import ConfigWatcher, needs_recompile
from usp_core.config.render import render_toml


def _repo(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(render_toml(), encoding="utf-8")
    return path


def _mutate(path, changes):
    res = atomic_write_config(path, changes, "manual", audit_log=path.parent / "audit.jsonl", enforce_guards=False)
    assert res.applied, res.reason


def test_dynamic_change_swaps_without_recompile(tmp_path):
    path = _repo(tmp_path)
    w = ConfigWatcher(path, environ={})
    first = w.config
    assert first == PredictorConfig.default() and not w.poll().changed
    _mutate(path, {"orchestration.cusum_k": 0.7})
    ev = w.poll()
    assert ev.changed and not ev.recompile and ev.previous is first
    assert w.config["orchestration.cusum_k"] == 0.7 and first["orchestration.cusum_k"] == 0.5
    assert not w.poll().changed


def test_static_change_requires_recompile(tmp_path):
    path = _repo(tmp_path)
    w = ConfigWatcher(path, environ={})
    _mutate(path, {"kernels.log_sig_depth": 4})
    ev = w.poll()
    assert ev.changed and ev.recompile and needs_recompile(ev.previous, ev.config)
    assert not needs_recompile(PredictorConfig.default(), PredictorConfig.default().replace({"cusum_k": 0.9}))


def test_bad_file_keeps_old_config_and_reports(tmp_path):
    path = _repo(tmp_path)
    w = ConfigWatcher(path, environ={})
    good = w.config
    path.write_text(path.read_text().replace("cusum_k = 0.5", "cusum_k = 99.0"))
    ev = w.poll()
    assert not ev.changed and ev.config is good and "cusum_k" in ev.error and "out of range" in ev.error
    path.write_text("not [ toml")
    assert "malformed TOML" in w.poll().error and w.config is good
    path.write_text(render_toml(dict(good.replace({"cusum_k": 0.8}))))
    ev = w.poll()
    assert ev.changed and ev.error is None and w.config["orchestration.cusum_k"] == 0.8


def test_touch_is_not_a_change_but_same_mtime_new_content_is(tmp_path):
    path = _repo(tmp_path)
    w = ConfigWatcher(path, environ={})
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not w.poll().changed
    st = os.stat(path)
    path.write_text(path.read_text().replace("cusum_k = 0.5", "cusum_k = 0.55"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # a coarse clock: the mtime did not move
    ev = w.poll()
    assert ev.changed and w.version == PredictorConfig.default().replace({"cusum_k": 0.55}).version


def test_environment_overrides_apply_on_reload(tmp_path):
    path = _repo(tmp_path)
    w = ConfigWatcher(path, environ={"USP_ORCHESTRATION__CUSUM_H": "7.5"})
    assert w.config["orchestration.cusum_h"] == 7.5
    _mutate(path, {"orchestration.cusum_k": 0.7})
    assert w.poll().changed and w.config["orchestration.cusum_h"] == 7.5

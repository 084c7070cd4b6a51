from __future__ import annotations

import numpy as np
import pytest

from usp_core.data.real import DEV_SERIES, load_dev_panel, load_series
from usp_core.data.schema import validate_observations


def test_dev_panel_has_ten_long_real_series_with_provenance():
    panel, provenance = load_dev_panel()
    assert len(DEV_SERIES) >= 10
    assert (provenance["n_points"] >= 500).all()
    assert set(provenance["package"]) == {"arch", "statsmodels"}
    assert provenance[["dataset", "column", "transformation"]].notna().all().all()
    clean, quarantine = validate_observations(panel, min_history=500)
    assert len(quarantine) == 0 and len(clean) == len(panel)


def test_series_values_and_transformations():
    returns, prov = load_series("sp500_return")
    log_close, _ = load_series("sp500_log_close")
    np.testing.assert_allclose(returns.to_numpy(), 100 * np.diff(log_close.to_numpy()))
    assert prov.package == "arch" and prov.column == "Adj Close"
    elnino, _ = load_series("elnino_sst")
    assert len(elnino) == 732 and elnino.index.is_monotonic_increasing
    ff, _ = load_series("ff_market_excess")
    assert ff.index[0].year == 1926
    short, _ = load_dev_panel(("vix",), max_length=100)
    assert len(short) == 100
    with pytest.raises(KeyError, match="available"):
        load_series("nope")

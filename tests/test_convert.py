import pathlib

import numpy as np
import pytest

from famf_jax import convert, handcrafted, inference

KEYS = pathlib.Path(__file__).parent / "data" / "famf-net-torch-keys.txt"


def torch_entries(section):
    """(key, shape) of one section ('OursNet' or 'DQN') of the original's key listing."""
    out, current = [], None
    for line in KEYS.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
        elif line and not line.startswith("#") and current == section:
            key, rest = line.split(" ", 1)
            shape = tuple(
                int(x) for x in rest[rest.index("(") + 1 : rest.index(")")].split(",") if x.strip()
            )
            out.append((key, shape))
    return out


def fake_state_dict(section, rng):
    sd = {}
    for key, shape in torch_entries(section):
        if key.endswith("num_batches_tracked"):
            sd[key] = np.array(7)
        elif key.endswith("running_var"):
            sd[key] = rng.uniform(0.5, 2, shape).astype(np.float32)
        else:
            sd[key] = rng.normal(0, 0.1, shape).astype(np.float32)
    gx, gy = handcrafted.gaussian_derivative_kernels()
    if section == "OursNet":
        sd["muatt_1.edge_extract.Gx_weight"] = np.broadcast_to(gx, (3, 3, 5, 5)).copy()
        sd["muatt_1.edge_extract.Gy_weight"] = np.broadcast_to(gy, (3, 3, 5, 5)).copy()
    return sd


def test_import_maps_every_key_with_layout(rng):
    sd = fake_state_dict("OursNet", rng)
    v = convert.from_torch(sd)
    w = sd["fire3_2.expand_3x3.0.weight"]  # (out, in, kh, kw)
    np.testing.assert_array_equal(
        v["params"]["fire3_2"]["expand_3x3"]["conv"]["kernel"], w.transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        v["batch_stats"]["muatt_1"]["bn"]["var"], sd["muatt_1.relu.0.running_var"]
    )
    np.testing.assert_array_equal(v["params"]["stem_1"]["bn"]["scale"], sd["stem_1.1.weight"])
    np.testing.assert_array_equal(
        v["params"]["conv10"]["kernel"][0, 0], sd["conv10.weight"][:, :, 0, 0].T
    )
    out = inference.predict(v, np.zeros((1, 64, 64, 3)), np.zeros((1, 64, 64, 3)), faithful=True)
    assert np.isfinite(out["probs"]).all()


def test_import_refuses_bad_state_dicts(rng):
    sd = fake_state_dict("OursNet", rng)
    missing = dict(sd)
    del missing["fire7_1.squeeze.1.running_mean"]
    with pytest.raises(ValueError, match=r"missing key 'fire7_1\.squeeze\.1\.running_mean'"):
        convert.from_torch(missing)
    extra = dict(sd, **{"fire10_1.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected key 'fire10_1\.weight'"):
        convert.from_torch(extra)
    wrong = dict(sd, **{"conv10.weight": np.zeros((2, 1024, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"key 'conv10\.weight' has shape \(2, 1024, 3, 3\)"):
        convert.from_torch(wrong)
    bad_edge = dict(sd, **{"muatt_1.edge_extract.Gx_weight": np.zeros((3, 3, 5, 5), np.float32)})
    with pytest.raises(ValueError, match="Gx_weight"):
        convert.from_torch(bad_edge)


def test_dqn_import(rng):
    sd = fake_state_dict("DQN", rng)
    p = convert.from_torch_dqn(sd)["params"]
    np.testing.assert_array_equal(p["fc_2"]["kernel"], sd["fc.2.weight"].T)
    np.testing.assert_array_equal(p["fc1"]["bias"], sd["fc1.bias"])
    del sd["fc2.bias"]
    with pytest.raises(ValueError, match=r"missing key 'fc2\.bias'"):
        convert.from_torch_dqn(sd)


def test_import_torch_mode_writes_a_restorable_checkpoint(tmp_path, rng, monkeypatch):
    from configs import famf as famf_config
    from famf_jax import experiment, import_torch, rdo

    sd = fake_state_dict("OursNet", rng)
    dqn = fake_state_dict("DQN", rng)
    monkeypatch.setattr(convert, "load_pth", lambda p: sd if p == "net.pth" else dqn)
    cfg = famf_config.get_config("smoke")
    cfg.import_path, cfg.import_dqn_path = "net.pth", "dqn.pth"
    cfg.train.batch_size = 4  # the DQN of the keys file takes B + 2 = 6 inputs
    import_torch.import_checkpoint(cfg, tmp_path)
    variables, meta = experiment.restore_for_eval(cfg, tmp_path, 0)
    assert meta["imported_from"] == "net.pth"
    np.testing.assert_array_equal(
        variables["params"]["fire4_2"]["squeeze"]["conv"]["kernel"],
        sd["fire4_2.squeeze.0.weight"].transpose(2, 3, 1, 0),
    )
    ckpt = experiment.checkpointer(tmp_path, 0, read_only=True)
    template, _ = experiment.create_state(cfg, 1)
    state, _ = ckpt.restore(0, template)
    q = rdo.find_state(state.opt_state).q_params
    np.testing.assert_array_equal(q["fc_0"]["kernel"], dqn["fc.0.weight"].T)

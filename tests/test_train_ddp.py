"""Training on several processes with torchrun (CPU, gloo): sharded cells, averaged gradients, one history,
rank-0 checkpoints, identical models on every rank, and one rank identical to a plain single process."""
import json
import os
import runpy
import subprocess
import sys
import textwrap

import numpy as np

WORKER = textwrap.dedent('''
    import json, os, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from scdeep_nb.checks import ToyModule, tiny_data
    from scdeep_nb.data import SingleCellData
    from scdeep_nb.train import Trainer, TrainingPlan, distributed_info

    out_dir = sys.argv[1]
    data = SingleCellData(tiny_data(n_cells=240, n_genes=40), layer="counts", check_zero_genes="ignore")
    train, val = data.split(0.2, seed=0)

    class Recording(ToyModule):
        "The checks' toy model (with batch-norm), recording which cells it trained on in the first epoch."
        seen = []
        def loss(self, batch, *, kl_weight=1.0):
            if self.training: self.seen.extend(batch["index"].tolist())
            return super().loss(batch, kl_weight=kl_weight)

    torch.manual_seed(0)
    module = Recording(data.n_vars, n_latent=3, batch_norm=True)
    trainer = Trainer(3, device="cpu", progress_bar=False, early_stopping=False, seed=0,
                      checkpoint_path=os.path.join(out_dir, "checkpoint.pt"))
    saves = []
    original = trainer._save_checkpoint
    trainer._save_checkpoint = lambda *a, **k: (saves.append(1), original(*a, **k))
    loader = data.loader(train, 32, shuffle=True, seed=0)
    history = trainer.fit(TrainingPlan(module, lr=1e-2), loader, data.loader(val, 64))
    rank, world = distributed_info()
    json.dump(dict(rank=rank, world=world, history=history.drop(columns="seconds").to_dict("list"),
                   weights=torch.cat([p.detach().reshape(-1) for p in module.state_dict().values()]).tolist(),
                   saves=len(saves), seen=module.seen[:loader._n_cells()], n_train=len(train)),
              open(os.path.join(out_dir, f"rank{rank}_of{world}.json"), "w"))
''')


def run(tmp_path, n_procs):
    "Run the worker with torchrun (n_procs processes) or as a plain process (n_procs=0: in this one); each rank's record."
    out = tmp_path / f"out{n_procs}"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    if n_procs == 0:  # in this process (saves starting one more interpreter)
        argv = sys.argv
        try:
            sys.argv = [str(script), str(out)]
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_procs}",
               str(script), str(out)]
        res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    records = [json.load(open(p)) for p in sorted(out.glob("rank*.json"))]
    assert (out / "checkpoint.pt").exists()
    return records


def test_two_processes_one_model_and_one_rank_equals_one_process(tmp_path):
    two = run(tmp_path, 2)
    assert [r["rank"] for r in two] == [0, 1] and all(r["world"] == 2 for r in two)
    # the same model and the same history on both ranks; rank 0 alone writes checkpoints
    np.testing.assert_array_equal(two[0]["weights"], two[1]["weights"])
    assert two[0]["history"] == two[1]["history"]
    assert two[0]["saves"] == 3 and two[1]["saves"] == 0
    # the ranks trained on disjoint halves of the cells (up to the padding of one rank)
    seen0, seen1 = set(two[0]["seen"]), set(two[1]["seen"])
    assert len(seen0 & seen1) <= 1 and len(seen0 | seen1) == two[0]["n_train"]
    loss = two[0]["history"]["train_loss"]
    assert loss[-1] < loss[0]
    # one process under torchrun is exactly a plain process
    one, plain = run(tmp_path, 1), run(tmp_path, 0)
    assert one[0]["world"] == 1 and plain[0]["world"] == 1
    np.testing.assert_array_equal(one[0]["weights"], plain[0]["weights"])
    assert one[0]["history"] == plain[0]["history"]
    assert one[0]["saves"] == 3

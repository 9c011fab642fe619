"""JIIO-80 attack variants vs PGD-20 on a trained adversarial-task MDEQ (first n test images,
or n from index FIRST in the environment: session 20 probed on images 1000-1299, not the table's)."""
import json, os, sys, time, torch
from dataclasses import replace
from pathlib import Path
from deqrun.studies.precision.checkpoint import load_model
from deqrun.studies.precision.runfolder import RunFolder
from deqrun.tasks.adversarial import attack_problem, pgd_attack, _plain_loss
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2); torch.manual_seed(0)
run = Path(sys.argv[1]); m = json.loads((run / 'metrics.json').read_text())
L = load_model(RunFolder(run, m, run / 'checkpoints' / 'last.pt')); model, task = L.model, L.task
model.eval(); n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
first = int(os.environ.get('FIRST', 0))
x = task.test_images[first:first + n]; y = task.test_labels[first:first + n]
print('clean', _plain_loss(model, x, y)[1].float().mean().item(), flush=True)
t = time.time(); xa, _ = pgd_attack(model, x, y, norm='l2', eps=1.0, lr=0.2, steps=20)
l, c = _plain_loss(model, xa, y)
print(f'pgd20 acc {c.float().mean():.3f} loss {l.mean():.3f} {time.time()-t:.1f}s', flush=True)
base = model.input_optimiser
variants = [dict()] + [json.loads(v) for v in sys.argv[4:]]
for v in variants:
    model.input_optimiser = replace(base, **v)
    t = time.time()
    out, _ = model(attack_problem(x, y, 'l2', 1.0, T=v.get('T', 80)))
    l, c = _plain_loss(model, out.x.detach(), y)
    print(f'jiio {v} acc {c.float().mean():.3f} loss {l.mean():.3f} {time.time()-t:.1f}s', flush=True)

"""``adapterhub glora-search``: GLoRA's supernet training and evolutionary search (Chavan et al. 2023,
arXiv 2306.07967; official ``Arnav0400/ViT-Slim`` ``GLoRA/supernet.py``, ``evolution_utils.py``).

1. **Supernet**: ``glora(r=R)`` (every support at its largest option) on the modules that
   ``--spec-pattern`` selects; every training step samples, for every layer, a uniformly random
   configuration of the 432 (each support uniform over its options) whose vector/scalar supports
   are slices of the held tensors (vector ``Xd[:, 0]``, scalar ``Xd[0, 0]``, see ``GloraLayer.path``).
2. **Evolution** over per-layer configurations, fitness = held-out loss with the configuration
   fixed (lower is better), subject to ``--param-limit``: a random population, then per generation
   the top-k of all candidates seen so far, ``mutations`` children of a top-k parent (each support
   redrawn with probability ``p``) and ``crossovers`` children of two top-k parents (each support from
   either), refilled with random ones. As in the official code, a candidate is evaluated once and
   children over the limit or already seen are redrawn (at most 10 tries per child). Differences:
   random candidates over the limit are repaired (random supports stepped down until they fit)
   instead of redrawn, so tight limits terminate; D is searched only where the base has a bias.
3. **Output**: a ``.surgery`` file with one rule per adapted module (``skip`` where nothing was
   chosen) that ``adapterhub plan`` accepts; ``--bundle`` also saves the subnet with the weights it
   inherits from the supernet.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from adapterhub.registry import AdapterhubError, hookimpl

from .glora import CHOICES, SUPPORTS, GloraLayer, config_size, format_call

DEMO_TEXT = (
    "Generalized LoRA adapts a frozen layer with five small support tensors. One scales the weight element by"
    " element, one adds to it, one turns the weight into a bias, and two scale and shift the bias. Each "
    "support may be low rank, a vector, a single number, or absent, and the best choice differs from layer to"
    " layer. A supernet holds the largest choice of every support and learns them all at once by sampling a "
    "different configuration at every step. An evolutionary search then keeps the configurations with the "
    "lowest held-out loss, mutates and crosses them, and stops at a parameter budget. The winner folds into "
    "the base weights, so inference costs nothing extra. "
) * 6

BUDGETS: dict[str, dict[str, int]] = {
    "full": dict(train_steps=50, population=50, generations=20, top_k=10, crossovers=25, mutations=25,
                 eval_batches=2),
    "small": dict(train_steps=10, population=8, generations=3, top_k=4, crossovers=3, mutations=3, eval_batches=2),
}
Config = tuple[tuple[str, ...], ...]  # per layer: the options of a..e


@dataclass
class SearchSettings:
    """Everything a search run depends on (the CLI options)."""

    model: str = "tiny-llama"
    text: str = DEMO_TEXT
    spec_pattern: str = "attn.*"
    rank: int = 4
    train_steps: int = 50
    population: int = 50
    generations: int = 20
    top_k: int = 10
    crossovers: int = 25
    mutations: int = 25
    mutation_prob: float = 0.2
    param_limit: int | None = None
    eval_batches: int = 2
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0


@dataclass
class Generation:
    index: int
    evaluated: int  # candidates evaluated so far
    best_loss: float  # best of every candidate seen so far (the top-k's first)
    best_params: int
    population_best: float
    population_mean: float
    best_mix: str  # how many supports of the best are lora/vector/scalar/none


@dataclass
class SearchResult:
    modules: list[str]
    best: Config
    best_loss: float
    best_params: int
    history: list[Generation] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    spec_text: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_params": self.best_params, "train_losses": self.train_losses,
                "history": [asdict(g) for g in self.history],
                "modules": {m: dict(zip(SUPPORTS, c)) for m, c in zip(self.modules, self.best)}}


def token_ids(model: Any, model_name: str, text: str) -> torch.Tensor:
    """Byte ids for the built-in models (and byte-vocabulary checkpoints), else the model's tokenizer."""
    from adapterhub.models import BUILTIN_MODELS

    as_bytes = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if model_name in BUILTIN_MODELS:
        return as_bytes
    try:
        from transformers import AutoTokenizer

        return torch.tensor(AutoTokenizer.from_pretrained(model_name)(text)["input_ids"], dtype=torch.long)
    except Exception as exc:
        vocab = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
        if 256 <= vocab < 512:  # a byte-level vocabulary like the built-ins'
            return as_bytes
        raise AdapterhubError(f"glora-search: no tokenizer for '{model_name}': {exc}") from None


class Search:
    """The supernet (GLoRA layers of one model) and the evolutionary search over it."""

    def __init__(self, s: SearchSettings, console: Console | None = None):
        import adapterhub
        from adapterhub.models import load_model

        self.s, self.console = s, console
        self.rng = random.Random(s.seed)
        model = load_model(s.model, seed=0)
        arch = type(model).__name__
        if not (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
            raise AdapterhubError(f"glora-search trains a causal language model; '{s.model}' is a {arch}")
        self.model = adapterhub.apply(model, f"{s.spec_pattern} -> glora(r={s.rank})", seed=s.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        named = [(n, m) for n, m in adapterhub.adapter_layers(self.model) if isinstance(m, GloraLayer)]
        if not named:
            raise AdapterhubError(f"glora-search: '{s.spec_pattern}' selects no module glora can wrap")
        self.modules = [n for n, _ in named]
        self.layers = [m for _, m in named]
        self.choices = [{k: CHOICES[k] if k != "d" or m.has_bias else ("none",) for k in SUPPORTS}
                        for m in self.layers]
        ids = token_ids(model, s.model, s.text)
        cut = int(len(ids) * 0.8)
        self.train_ids, self.held_ids = ids[:cut], ids[cut:]
        if min(len(self.train_ids), len(self.held_ids)) <= s.seq_len:
            raise AdapterhubError(f"glora-search: the text gives {len(ids)} tokens; 80/20 train/held-out parts "
                                  f"must each be longer than --seq-len {s.seq_len}")
        n_eval = s.eval_batches * s.batch_size
        span = len(self.held_ids) - s.seq_len
        starts = [round(i * span / max(n_eval - 1, 1)) for i in range(n_eval)]
        held = torch.stack([self.held_ids[i:i + s.seq_len] for i in starts]).to(self.device)
        self.eval_batches = list(held.split(s.batch_size))
        self.seen: dict[Config, tuple[float, int]] = {}

    # -- candidates ----------------------------------------------------------------------
    def params(self, cand: Config) -> int:
        return sum(config_size(dict(zip(SUPPORTS, c)), m.in_features, m.out_features, m.r, m.has_bias)
                   for c, m in zip(cand, self.layers))

    def random_config(self) -> Config:
        return tuple(tuple(self.rng.choice(ch[k]) for k in SUPPORTS) for ch in self.choices)

    def set_path(self, cand: Config | None) -> None:
        for c, m in zip(cand or [None] * len(self.layers), self.layers):
            m.path = dict(zip(SUPPORTS, c)) if c is not None else None

    def fits(self, cand: Config) -> bool:
        return self.s.param_limit is None or self.params(cand) <= self.s.param_limit

    def repair(self, cand: Config) -> Config:
        """Step random supports down (lora -> vector -> scalar -> none) until ``cand`` fits the limit."""
        layers = [list(c) for c in cand]
        while not self.fits(tuple(map(tuple, layers))):
            slots = [(i, j) for i, c in enumerate(layers) for j, o in enumerate(c) if o != "none"]
            i, j = self.rng.choice(slots)
            opts = CHOICES[SUPPORTS[j]]
            layers[i][j] = opts[opts.index(layers[i][j]) + 1]
        return tuple(map(tuple, layers))

    # -- supernet ------------------------------------------------------------------------
    def train_supernet(self) -> list[float]:
        s, model = self.s, self.model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=s.lr)
        g = torch.Generator().manual_seed(s.seed)
        losses: list[float] = []
        model.train()
        with self._progress("supernet") as bar:
            task = bar.add_task("train", total=s.train_steps, info="")
            for _ in range(s.train_steps):
                starts = torch.randint(0, len(self.train_ids) - s.seq_len, (s.batch_size,), generator=g).tolist()
                ids = torch.stack([self.train_ids[i:i + s.seq_len] for i in starts]).to(self.device)
                self.set_path(self.random_config())  # a random configuration per layer for this forward
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(round(loss.item(), 6))
                bar.update(task, advance=1, info=f"loss {losses[-1]:.3f}")
        self.set_path(None)
        model.eval()
        return losses

    @torch.no_grad()
    def fitness(self, cand: Config) -> float:
        self.set_path(cand)
        loss = sum(self.model(input_ids=ids, labels=ids).loss.item() for ids in self.eval_batches)
        self.set_path(None)
        return loss / len(self.eval_batches)

    def admit(self, cand: Config) -> bool:
        """Evaluate an unseen candidate within the limit (official ``is_legal``)."""
        if cand in self.seen or not self.fits(cand):
            return False
        self.seen[cand] = (self.fitness(cand), self.params(cand))
        return True

    # -- evolution -----------------------------------------------------------------------
    def fill_random(self, pop: list[Config], size: int) -> None:
        tries = 0
        while len(pop) < size and tries < 50 * size:
            tries += 1
            cand = self.repair(self.random_config())
            if self.admit(cand):
                pop.append(cand)

    def children(self, top: list[Config], n: int, crossover: bool) -> list[Config]:
        out: list[Config] = []
        for _ in range(10 * n):
            if len(out) >= n:
                break
            if crossover:
                p1, p2 = self.rng.choice(top), self.rng.choice(top)
                cand = tuple(tuple(self.rng.choice((x, y)) for x, y in zip(a, b)) for a, b in zip(p1, p2))
            else:
                parent = self.rng.choice(top)
                cand = tuple(tuple(self.rng.choice(ch[k]) if self.rng.random() < self.s.mutation_prob else o
                                   for k, o in zip(SUPPORTS, c)) for c, ch in zip(parent, self.choices))
            if self.admit(cand):
                out.append(cand)
        return out

    def evolve(self) -> tuple[list[Generation], list[Config]]:
        s = self.s
        pop: list[Config] = []
        top: list[Config] = []
        history: list[Generation] = []
        with self._progress("search") as bar:
            task = bar.add_task("search", total=s.generations, info="")
            self.fill_random(pop, s.population)
            for gen in range(s.generations):
                if not pop and not top:
                    raise AdapterhubError("glora-search: no candidate fits --param-limit")
                top = sorted(set(top) | set(pop), key=lambda c: (self.seen[c][0], c))[:s.top_k]
                losses = [self.seen[c][0] for c in pop] or [float("nan")]
                best_loss, best_params = self.seen[top[0]]
                mix = "/".join(str(sum(c.count(o) for c in top[0])) for o in ("lora", "vector", "scalar", "none"))
                history.append(Generation(gen, len(self.seen), best_loss, best_params, min(losses),
                                          sum(losses) / len(losses), mix))
                bar.update(task, advance=1, info=f"best {best_loss:.4f}")
                if gen + 1 < s.generations:
                    pop = self.children(top, s.mutations, False) + self.children(top, s.crossovers, True)
                    self.fill_random(pop, s.population)
        return history, top

    def run(self) -> SearchResult:
        train_losses = self.train_supernet()
        history, top = self.evolve()
        best = top[0]
        result = SearchResult(self.modules, best, *self.seen[best], history, train_losses)
        result.spec_text = self.spec_text(result)
        return result

    def spec_text(self, r: SearchResult, path: str = "<this file>") -> str:
        s = self.s
        limit = f"{s.param_limit:,}" if s.param_limit is not None else "none"
        lines = ["# GLoRA configuration found by `adapterhub glora-search` (Chavan et al. 2023, arXiv 2306.07967)",
                 f"# model {s.model}, supernet {s.spec_pattern} r={s.rank}, {s.train_steps} steps, seed {s.seed}",
                 f"# evolution: population {s.population}, {s.generations} generations, top {s.top_k}, "
                 f"{s.crossovers} crossovers + {s.mutations} mutations (p={s.mutation_prob:g})",
                 f"# best held-out loss {r.best_loss:.4f} with {r.best_params:,} trainable parameters (limit {limit})",
                 f"# try: adapterhub plan {path} --model {s.model}"]
        for name, cfg in zip(self.modules, r.best):
            chosen = dict(zip(SUPPORTS, cfg))
            lines.append(f"{name} -> skip" if set(cfg) == {"none"} else f"{name} -> {format_call(chosen, s.rank)}")
        return "\n".join(lines) + "\n"

    def save_bundle(self, r: SearchResult, directory: Path) -> None:
        """Apply the found spec to a fresh model, copy the inherited (sliced) supernet tensors, save."""
        import adapterhub
        from adapterhub.models import load_model

        sub = adapterhub.apply(load_model(self.s.model, seed=0), r.spec_text, seed=self.s.seed)
        layers = dict(adapterhub.adapter_layers(sub))
        with torch.no_grad():
            for name, cfg, sup in zip(self.modules, r.best, self.layers):
                if name not in layers:
                    continue
                for k, opt in zip(SUPPORTS, cfg):
                    held = getattr(layers[name], f"glora_{k.upper()}")
                    src = sup.support(k, opt)
                    if isinstance(src, tuple):
                        held["Xd"].copy_(src[0]), held["Xu"].copy_(src[1])
                    elif src is not None:
                        held["X"].copy_(src.reshape(held["X"].shape))
        adapterhub.save(sub, directory, metrics={"glora_search_loss": round(r.best_loss, 6)})

    def _progress(self, label: str) -> Progress:
        return Progress(TextColumn(f"[bold]{label}[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console,
                        disable=self.console is None)


def history_table(r: SearchResult) -> Table:
    table = Table(title="glora-search: best configuration per generation", title_justify="left")
    for col in ("gen", "evaluated", "best loss", "params", "pop. best", "pop. mean", "best: lora/vector/scalar/none"):
        table.add_column(col, justify="left" if col.startswith("best:") else "right")
    for g in r.history:
        table.add_row(str(g.index), str(g.evaluated), f"{g.best_loss:.4f}", f"{g.best_params:,}",
                      f"{g.population_best:.4f}", f"{g.population_mean:.4f}", g.best_mix)
    return table


def parse_count(text: str | None) -> int | None:
    """``20000``, ``20k``, ``1.5M`` -> a parameter count."""
    if text is None:
        return None
    t = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a parameter count (e.g. 20000, 20k, 1.5M)") from None
    if value < 0:
        raise click.BadParameter(f"'{text}': must be >= 0")
    return int(value)


@click.command("glora-search",
               short_help="Search per-layer GLoRA supports by evolution; write the best as a .surgery file.",
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", "-m", default="tiny-llama", show_default=True, help="built-in model or model directory")
@click.option("--data", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="a text file (80% trains the supernet, 20% is held out); default: a built-in demo text")
@click.option("--out", "-o", default="glora-search.surgery", show_default=True, type=click.Path(path_type=Path),
              help="the .surgery file to write")
@click.option("--spec-pattern", default="attn.*", show_default=True, help="which modules get GLoRA")
@click.option("--rank", "-r", default=4, show_default=True, type=click.IntRange(1), help="rank of lora supports")
@click.option("--budget", type=click.Choice(sorted(BUDGETS)), default="full", show_default=True,
              help="preset for the options below that are not given (small: a quick test)")
@click.option("--train-steps", type=click.IntRange(0), help="supernet training steps [full: 50]")
@click.option("--population", type=click.IntRange(1), help="candidates per generation [full: 50]")
@click.option("--generations", type=click.IntRange(1), help="generations [full: 20]")
@click.option("--top-k", type=click.IntRange(1), help="parents kept per generation [full: 10]")
@click.option("--crossovers", type=click.IntRange(0), help="crossover children per generation [full: 25]")
@click.option("--mutations", type=click.IntRange(0), help="mutated children per generation [full: 25]")
@click.option("--mutation-prob", default=0.2, show_default=True, type=click.FloatRange(0, 1))
@click.option("--eval-batches", type=click.IntRange(1), help="held-out batches per fitness [full: 2]")
@click.option("--param-limit", help="most trainable parameters allowed (e.g. 20000, 20k, 0.1M)")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=64, show_default=True, type=click.IntRange(2))
@click.option("--lr", default=3e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--seed", default=0, show_default=True)
@click.option("--bundle", type=click.Path(file_okay=False, path_type=Path),
              help="also save the found subnet with its inherited supernet weights as a bundle")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary instead of tables")
def glora_search_cmd(data: Path | None, out: Path, budget: str, param_limit: str | None, bundle: Path | None,
                     as_json: bool, **opts: Any) -> None:
    """GLoRA search (Chavan et al. 2023): train a GLoRA supernet on --spec-pattern, search per-layer
    configurations by evolution under --param-limit, and write the winner as a .surgery file."""
    from adapterhub.report import make_console

    opts.update({k: v for k, v in BUDGETS[budget].items() if opts.get(k) is None})
    text = data.read_text(encoding="utf-8") if data is not None else DEMO_TEXT
    settings = SearchSettings(text=text, param_limit=parse_count(param_limit), **opts)
    console = None if as_json else make_console()
    search = Search(settings, console)
    result = search.run()
    result.spec_text = search.spec_text(result, str(out))
    out.write_text(result.spec_text)
    if bundle is not None:
        search.save_bundle(result, bundle)
    if as_json:
        click.echo(json.dumps({"out": str(out), "bundle": str(bundle) if bundle else None,
                               "param_limit": settings.param_limit, **result.to_json()}, indent=2))
        return
    console.print(history_table(result))
    console.print(f"best: held-out loss {result.best_loss:.4f}, {result.best_params:,} trainable parameters "
                  f"-> wrote {out}" + (f" and bundle {bundle}" if bundle else ""), highlight=False)


@hookimpl
def register_commands(cli):
    cli.add_command(glora_search_cmd)

"""Learning-rate schedules, the same recursion (and the same Python floats) as torch.optim.lr_scheduler.

torch's schedulers do not evaluate a closed form per step: each ``step()`` derives the new rate
from the rate the optimizer holds now ("chainable" form).  Rounding therefore accumulates, and
the closed form (``base·(1 + cos(πt/T))/2``) differs from torch's rates in the last bits after a
few steps.  Each class below keeps the state torch keeps (``last_epoch``, ``_step_count``, the
initial-step flag) and evaluates its ``get_lr`` expression operand for operand, in the same order
(``last_epoch * π / T`` in one branch, ``π * last_epoch / T`` in another, as torch writes them).

A schedule drives a *group*: a dict ``{"lr": …, "initial_lr": …}`` shared by the schedulers of a
SequentialLR, as a torch param_group is.  ``schedule.lr`` is the rate for the next optimizer step;
call ``schedule.step()`` after each optimizer step, as with torch.

    warmup_cosine  LinearLR(start_factor → 1 over warmup_steps), then CosineAnnealingLR
                   (T_max = steps − warmup_steps, eta_min = min_lr), through SequentialLR
                   (milestone warmup_steps: there the cosine restarts from its closed form at 0)
    cosine         CosineAnnealingLR(T_max = steps, eta_min = min_lr)
    step           StepLR(step_size, gamma): lr ← lr·gamma every step_size steps
"""
import math

SCHEDULES = {
    "warmup_cosine": ("warmup_steps", "min_lr", "start_factor"),
    "cosine": ("min_lr",),
    "step": ("step_size", "gamma"),
}


class _Scheduler:
    """torch.optim.lr_scheduler.LRScheduler's state machine over one group."""

    def __init__(self, group):
        self.group = group
        group.setdefault("initial_lr", group["lr"])
        self.base_lr = group["initial_lr"]
        self.last_epoch = -1
        self._is_initial = False
        self._initial_step()

    def _initial_step(self):
        self._step_count = 0
        self._is_initial = True
        self.step()
        self._is_initial = False

    def step(self):
        self._step_count += 1
        self._update_lr()

    def _update_lr(self, epoch=None):
        if epoch is None:
            self.last_epoch += 1
            value = self.get_lr()
        else:  # a given epoch uses the closed form where the class has one
            self.last_epoch = epoch
            value = self.closed_form_lr() if hasattr(self, "closed_form_lr") else self.get_lr()
        self.group["lr"] = value

    @property
    def lr(self):
        return self.group["lr"]

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "step_count": self._step_count, "lr": self.group["lr"],
                "initial_lr": self.group["initial_lr"]}

    def load_state_dict(self, state):
        self.last_epoch, self._step_count = state["last_epoch"], state["step_count"]
        self.group["lr"], self.group["initial_lr"] = state["lr"], state["initial_lr"]


class LinearLR(_Scheduler):
    """lr·start_factor at epoch 0, then ×(1 + (e − s)/(T·s + (t − 1)(e − s))) up to epoch T."""

    def __init__(self, group, start_factor=1.0 / 3, end_factor=1.0, total_iters=5):
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters
        super().__init__(group)

    def get_lr(self):
        lr = self.group["lr"]
        if self.last_epoch == 0:
            return lr * self.start_factor
        if self._is_initial or self.last_epoch > self.total_iters:
            return lr
        return lr * (1.0 + (self.end_factor - self.start_factor)
                     / (self.total_iters * self.start_factor
                        + (self.last_epoch - 1) * (self.end_factor - self.start_factor)))


class CosineAnnealingLR(_Scheduler):
    """ηₜ = η_min + (ηₜ₋₁ − η_min)·(1 + cos(πt/T)) / (1 + cos(π(t − 1)/T)), recursively."""

    def __init__(self, group, T_max, eta_min=0.0):
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(group)

    def get_lr(self):
        lr, base, eta_min, t, T = self.group["lr"], self.base_lr, self.eta_min, self.last_epoch, self.T_max
        if self._is_initial:
            return lr
        if self._step_count == 1 and t > 0:
            return eta_min + (base - eta_min) * (1 + math.cos((t) * math.pi / T)) / 2
        if (t - 1 - T) % (2 * T) == 0:
            return lr + (base - eta_min) * (1 - math.cos(math.pi / T)) / 2
        return (1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) \
            * (lr - eta_min) + eta_min

    def closed_form_lr(self):
        return self.eta_min + (self.base_lr - self.eta_min) \
            * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2


class StepLR(_Scheduler):
    """lr ← lr·gamma at every non-zero multiple of step_size."""

    def __init__(self, group, step_size, gamma=0.1):
        self.step_size, self.gamma = step_size, gamma
        super().__init__(group)

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self.group["lr"]
        return self.group["lr"] * self.gamma

    def closed_form_lr(self):
        return self.base_lr * self.gamma ** (self.last_epoch // self.step_size)


def _bisect_right(milestones, t):
    """How many milestones are <= t (bisect.bisect_right over the sorted list, as torch uses)."""
    return sum(1 for m in milestones if m <= t)


class SequentialLR:
    """schedulers[i] runs from milestones[i − 1]; at a milestone the next one starts from its
    closed form at epoch 0 (torch's ``_update_lr(0)``), afterwards it steps recursively."""

    def __init__(self, group, schedulers, milestones):
        self.group, self.schedulers, self.milestones = group, schedulers, list(milestones)
        self.last_epoch = 0
        group["lr"] = group["initial_lr"]
        for s in schedulers:              # undo the step each made when it was built
            s.last_epoch -= 1
        schedulers[_bisect_right(self.milestones, 0)]._initial_step()

    def step(self):
        self.last_epoch += 1
        idx = _bisect_right(self.milestones, self.last_epoch)
        if idx > 0 and self.milestones[idx - 1] == self.last_epoch:
            self.schedulers[idx]._update_lr(0)
        else:
            self.schedulers[idx].step()

    @property
    def lr(self):
        return self.group["lr"]

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state):
        self.last_epoch = state["last_epoch"]
        for s, st in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(st)


def _integer(key, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"lr_schedule.{key}: expected an integer >= {low}, got {value!r}")
    return value


def _number(key, value, low, high=None, low_open=False):
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
        or value < low or (low_open and value == low) or (high is not None and value > high)
    if bad:
        interval = f"{'(' if low_open else '['}{low:g}, {'∞)' if high is None else f'{high:g}]'}"
        raise ValueError(f"lr_schedule.{key}: expected a number in {interval}, got {value!r}")
    return float(value)


def schedule_settings(config, steps):
    """A spec's ``lr_schedule`` object -> the schedulers' arguments, validated, for a run of
    ``steps`` optimizer steps.  The one place defaults live (the twin builds torch's schedulers
    from the same dict):  warmup_cosine -> {name, start_factor, warmup_steps, T_max, eta_min};
    cosine -> {name, T_max, eta_min};  step -> {name, step_size, gamma}.

    start_factor (warmup_cosine, optional) defaults to 1 / warmup_steps.
    """
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"lr_schedule: expected an object with a 'name', got {config!r}")
    name = config["name"]
    if name not in SCHEDULES:
        raise ValueError(f"lr_schedule.name: unknown schedule {name!r}; expected one of "
                         f"{', '.join(SCHEDULES)}")
    unknown = sorted(set(config) - {"name"} - set(SCHEDULES[name]))
    if unknown:
        raise ValueError(f"lr_schedule.{unknown[0]}: not a setting of {name!r}; expected among "
                         f"{', '.join(SCHEDULES[name])}")
    if name == "step":
        return {"name": name, "step_size": _integer("step_size", config.get("step_size"), 1),
                "gamma": _number("gamma", config.get("gamma", 0.1), 0, low_open=True)}
    eta_min = _number("min_lr", config.get("min_lr", 0.0), 0)
    if name == "cosine":
        return {"name": name, "T_max": steps, "eta_min": eta_min}
    warmup = _integer("warmup_steps", config.get("warmup_steps"), 1)
    if warmup >= steps:
        raise ValueError(f"lr_schedule.warmup_steps: the warm-up ({warmup} steps) must be shorter "
                         f"than the run ({steps} steps)")
    start = _number("start_factor", config.get("start_factor", 1.0 / warmup), 0, 1.0, low_open=True)
    return {"name": name, "start_factor": start, "warmup_steps": warmup, "T_max": steps - warmup,
            "eta_min": eta_min}


def make_schedule(config, lr, steps):
    """The schedule for a spec's ``lr_schedule`` over ``steps`` optimizer steps from rate ``lr``;
    its ``.lr`` is step 0's rate.  config: the spec object, or None for a constant rate (None)."""
    if config is None:
        return None
    s = schedule_settings(config, steps)
    group = {"lr": float(lr)}
    if s["name"] == "step":
        return StepLR(group, s["step_size"], s["gamma"])
    if s["name"] == "cosine":
        return CosineAnnealingLR(group, s["T_max"], s["eta_min"])
    warmup = LinearLR(group, s["start_factor"], 1.0, s["warmup_steps"])
    cosine = CosineAnnealingLR(group, s["T_max"], s["eta_min"])
    return SequentialLR(group, [warmup, cosine], [s["warmup_steps"]])


def learning_rates(schedule, n):
    """The rates of the next n optimizer steps (stepping the schedule n times)."""
    rates = []
    for _ in range(n):
        rates.append(schedule.lr)
        schedule.step()
    return rates

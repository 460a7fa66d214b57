"""Independent reference implementations for the loss tests: design.md §4.1 written out literally.

Float64, Python loops over anchors and negatives, state in dictionaries of plain (not log) s. Nothing here is
shared with clip_dro.losses.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch


class BruteRobustLoss:
    """iSogCLR (mode "individual"), RGCL-g ("global") or SogCLR ("fixed"), one step per ``step`` call.

    Duplicate ids in a batch: one update per id with the mean of its positions' g and clipped G.
    Counts how often G was clipped and how often τ hit a bound, so that tests can check they were exercised.
    """

    def __init__(self, mode: str, *, gamma: float, rho: float, tau_init: float, tau_min: float, tau_max: float,
                 tau_lr: float, tau_momentum: float, tau_grad_clip: float, tau_warmup_steps: int = 0) -> None:
        self.mode, self.gamma, self.rho = mode, gamma, rho
        self.tau_init, self.tau_min, self.tau_max = tau_init, tau_min, tau_max
        self.lr, self.beta, self.clip, self.warmup = tau_lr, tau_momentum, tau_grad_clip, tau_warmup_steps
        self.s = {"image": {}, "text": {}}
        self.m = {"image": defaultdict(float), "text": defaultdict(float)}
        self.tau = {"image": defaultdict(lambda: tau_init), "text": defaultdict(lambda: tau_init)}
        self.global_tau, self.global_m = tau_init, 0.0
        self.steps = 0
        self.clipped = {"low": 0, "high": 0}
        self.bound_hits = {"low": 0, "high": 0}

    def temperature(self, side: str, i: int) -> float:
        if self.mode == "individual":
            return self.tau[side][i]
        if self.mode == "global":
            return self.global_tau
        return self.tau_init

    def _clip(self, value: float) -> float:
        if value > self.clip:
            self.clipped["high"] += 1
        if value < -self.clip:
            self.clipped["low"] += 1
        return max(-self.clip, min(self.clip, value))

    def _bounded(self, value: float) -> float:
        if value < self.tau_min:
            self.bound_hits["low"] += 1
        if value > self.tau_max:
            self.bound_hits["high"] += 1
        return max(self.tau_min, min(self.tau_max, value))

    def step(self, x: torch.Tensor, t: torch.Tensor, image_ids: list[int], text_ids: list[int]) -> torch.Tensor:
        """The loss (autograd through x and t); updates the state."""
        n = len(image_ids)
        sim = x @ t.T
        diff = {"image": lambda k, j: sim[k, j] - sim[k, k], "text": lambda k, j: sim[j, k] - sim[k, k]}
        ids = {"image": image_ids, "text": text_ids}
        loss = torch.zeros((), dtype=x.dtype)
        grads = {}
        for side in ("image", "text"):
            h = diff[side]
            taus = [self.temperature(side, ids[side][k]) for k in range(n)]
            g = [sum(math.exp(float(h(k, j).detach()) / taus[k]) for j in range(n) if j != k) / (n - 1)
                 for k in range(n)]
            positions = defaultdict(list)
            for k in range(n):
                positions[ids[side][k]].append(k)
            s_new = {}
            for i, ks in positions.items():
                g_mean = sum(g[k] for k in ks) / len(ks)
                s_new[i] = g_mean if i not in self.s[side] else (1 - self.gamma) * self.s[side][i] + self.gamma * g_mean
            grads[side] = []
            for k in range(n):
                s = s_new[ids[side][k]]
                weighted_h = torch.zeros((), dtype=x.dtype)
                weighted_z = 0.0
                for j in range(n):
                    if j == k:
                        continue
                    w = math.exp(float(h(k, j).detach()) / taus[k]) / s
                    weighted_h = weighted_h + w * h(k, j)
                    weighted_z += w * float(h(k, j).detach()) / taus[k]
                loss = loss + weighted_h / (n - 1) / n
                grads[side].append(math.log(s) + self.rho - weighted_z / (n - 1))
            self.s[side].update(s_new)
            grads[side + "_taus"] = taus
            grads[side + "_positions"] = positions
        self._update_tau(grads)
        self.steps += 1
        return loss

    def _update_tau(self, grads: dict) -> None:
        hold = self.steps < self.warmup
        if self.mode == "individual":
            for side in ("image", "text"):
                for i, ks in grads[side + "_positions"].items():
                    clipped = sum(self._clip(grads[side][k]) for k in ks) / len(ks)
                    self.m[side][i] = (1 - self.beta) * self.m[side][i] + self.beta * clipped
                    if not hold:
                        tau = grads[side + "_taus"][ks[0]]
                        self.tau[side][i] = self._bounded(tau - self.lr * self.m[side][i])
        elif self.mode == "global":
            n = len(grads["image"])
            mean = sum(grads["image"][k] + grads["text"][k] for k in range(n)) / n
            self.global_m = (1 - self.beta) * self.global_m + self.beta * self._clip(mean)
            if not hold:
                self.global_tau = self._bounded(self.global_tau - self.lr * self.global_m)


def objective(x: torch.Tensor, t: torch.Tensor, tau_image: list[float], tau_text: list[float],
              rho: float) -> torch.Tensor:
    """The robust objective's batch estimate (1/B) Σ_k [τ^I_k log g^I_k + τ^T_k log g^T_k + (τ^I_k + τ^T_k) ρ]."""
    n = x.shape[0]
    sim = x @ t.T
    total = torch.zeros((), dtype=x.dtype)
    for k in range(n):
        image_terms = torch.stack([torch.exp((sim[k, j] - sim[k, k]) / tau_image[k]) for j in range(n) if j != k])
        text_terms = torch.stack([torch.exp((sim[j, k] - sim[k, k]) / tau_text[k]) for j in range(n) if j != k])
        total = total + tau_image[k] * (torch.log(image_terms.mean()) + rho)
        total = total + tau_text[k] * (torch.log(text_terms.mean()) + rho)
    return total / n

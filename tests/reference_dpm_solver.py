"""A float64 numpy rewrite of the official DPM-Solver algorithm, the parity reference of
`test_sampling.py`.

It follows LuChengTHU/dpm-solver `dpm_solver_pytorch.py` and the older copies U-ViT bundles
(`dpm_solver_pytorch.py` with `fast_version=True` for VP models, `dpm_solver_pp.py` for discrete
ones) step by step in the official formulas' own form, and shares no code with the jitted
implementation, which expands the same formulas into a per-NFE coefficient table.
"""

import numpy as np


class RefVP:
    """Official NoiseScheduleVP('linear')."""

    b0, b1 = 0.1, 20.0

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.b1 - self.b0) - 0.5 * t * self.b0

    def std(self, t):
        return np.sqrt(1.0 - np.exp(2.0 * self.log_alpha(t)))

    def lam(self, t):
        la = self.log_alpha(t)
        return la - 0.5 * np.log(1.0 - np.exp(2.0 * la))

    def inv_lam(self, lamb):
        tmp = 2.0 * (self.b1 - self.b0) * np.logaddexp(-2.0 * lamb, 0.0)
        delta = self.b0**2 + tmp
        return tmp / (np.sqrt(delta) + self.b0) / (self.b1 - self.b0)


class RefDiscrete(RefVP):
    """Official NoiseScheduleVP('discrete', betas=SD betas) (inside [1/N, 1]: plain interp)."""

    def __init__(self):
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
        self.log_alphas = 0.5 * np.cumsum(np.log(1.0 - betas))
        self.ts = np.linspace(0.0, 1.0, 1001)[1:]

    def log_alpha(self, t):
        return np.interp(t, self.ts, self.log_alphas)

    def inv_lam(self, lamb):
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lamb)
        return np.interp(log_alpha, self.log_alphas[::-1], self.ts[::-1])


class RefDPMSolver:
    def __init__(self, eps_fn, ns, predict_x0, thresholding=False):
        self.eps_fn, self.ns = eps_fn, ns
        self.predict_x0, self.thresholding = predict_x0, thresholding

    def model(self, x, t):
        eps = self.eps_fn(x, np.full(x.shape[0], t))
        if not self.predict_x0:
            return eps
        x0 = (x - self.ns.std(t) * eps) / np.exp(self.ns.log_alpha(t))
        if self.thresholding:
            s = np.quantile(np.abs(x0).reshape(x0.shape[0], -1), 0.995, axis=1)
            s = np.maximum(s, 1.0)[:, None]
            x0 = np.clip(x0, -s, s) / s
        return x0

    def time_steps(self, skip, t_T, t_0, n):
        if skip == "logSNR":
            return self.ns.inv_lam(np.linspace(self.ns.lam(t_T), self.ns.lam(t_0), n + 1))
        if skip == "time_uniform":
            return np.linspace(t_T, t_0, n + 1)
        return np.linspace(t_T**0.5, t_0**0.5, n + 1) ** 2

    def first(self, x, s, t, m_s=None):
        ns = self.ns
        h = ns.lam(t) - ns.lam(s)
        m_s = self.model(x, s) if m_s is None else m_s
        if self.predict_x0:
            return ns.std(t) / ns.std(s) * x - np.exp(ns.log_alpha(t)) * np.expm1(-h) * m_s
        return np.exp(ns.log_alpha(t) - ns.log_alpha(s)) * x - ns.std(t) * np.expm1(h) * m_s

    def second(self, x, s, t, r1=0.5):
        ns = self.ns
        lam_s = ns.lam(s)
        h = ns.lam(t) - lam_s
        s1 = ns.inv_lam(lam_s + r1 * h)
        a_s1, a_t = np.exp(ns.log_alpha(s1)), np.exp(ns.log_alpha(t))
        m_s = self.model(x, s)
        if self.predict_x0:
            phi_11, phi_1 = np.expm1(-r1 * h), np.expm1(-h)
            x_s1 = ns.std(s1) / ns.std(s) * x - a_s1 * phi_11 * m_s
            m_s1 = self.model(x_s1, s1)
            return (
                ns.std(t) / ns.std(s) * x
                - a_t * phi_1 * m_s
                - (0.5 / r1) * (a_t * phi_1) * (m_s1 - m_s)
            )
        phi_11, phi_1 = np.expm1(r1 * h), np.expm1(h)
        x_s1 = np.exp(ns.log_alpha(s1) - ns.log_alpha(s)) * x - ns.std(s1) * phi_11 * m_s
        m_s1 = self.model(x_s1, s1)
        return (
            np.exp(ns.log_alpha(t) - ns.log_alpha(s)) * x
            - ns.std(t) * phi_1 * m_s
            - (0.5 / r1) * (ns.std(t) * phi_1) * (m_s1 - m_s)
        )

    def third(self, x, s, t, r1=1.0 / 3.0, r2=2.0 / 3.0):
        ns = self.ns
        lam_s = ns.lam(s)
        h = ns.lam(t) - lam_s
        s1, s2 = ns.inv_lam(lam_s + r1 * h), ns.inv_lam(lam_s + r2 * h)
        sig_s, sig_s1, sig_s2, sig_t = ns.std(s), ns.std(s1), ns.std(s2), ns.std(t)
        la_s, la_s1, la_s2, la_t = (ns.log_alpha(u) for u in (s, s1, s2, t))
        a_s1, a_s2, a_t = np.exp(la_s1), np.exp(la_s2), np.exp(la_t)
        m_s = self.model(x, s)
        if self.predict_x0:
            phi_11, phi_12, phi_1 = np.expm1(-r1 * h), np.expm1(-r2 * h), np.expm1(-h)
            phi_22 = np.expm1(-r2 * h) / (r2 * h) + 1.0
            phi_2 = phi_1 / h + 1.0
            x_s1 = sig_s1 / sig_s * x - a_s1 * phi_11 * m_s
            m_s1 = self.model(x_s1, s1)
            x_s2 = (
                sig_s2 / sig_s * x - a_s2 * phi_12 * m_s + r2 / r1 * (a_s2 * phi_22) * (m_s1 - m_s)
            )
            m_s2 = self.model(x_s2, s2)
            return sig_t / sig_s * x - a_t * phi_1 * m_s + (1.0 / r2) * (a_t * phi_2) * (m_s2 - m_s)
        phi_11, phi_12, phi_1 = np.expm1(r1 * h), np.expm1(r2 * h), np.expm1(h)
        phi_22 = np.expm1(r2 * h) / (r2 * h) - 1.0
        phi_2 = np.expm1(h) / h - 1.0
        x_s1 = np.exp(la_s1 - la_s) * x - sig_s1 * phi_11 * m_s
        m_s1 = self.model(x_s1, s1)
        x_s2 = (
            np.exp(la_s2 - la_s) * x
            - sig_s2 * phi_12 * m_s
            - r2 / r1 * (sig_s2 * phi_22) * (m_s1 - m_s)
        )
        m_s2 = self.model(x_s2, s2)
        return (
            np.exp(la_t - la_s) * x
            - sig_t * phi_1 * m_s
            - (1.0 / r2) * (sig_t * phi_2) * (m_s2 - m_s)
        )

    def multistep2(self, x, ms, ts, t):
        ns = self.ns
        lam_1, lam_0, lam_t = ns.lam(ts[-2]), ns.lam(ts[-1]), ns.lam(t)
        h = lam_t - lam_0
        d1_0 = (1.0 / ((lam_0 - lam_1) / h)) * (ms[-1] - ms[-2])
        if self.predict_x0:
            phi_1 = np.expm1(-h)
            a_t = np.exp(ns.log_alpha(t))
            return ns.std(t) / ns.std(ts[-1]) * x - a_t * phi_1 * ms[-1] - 0.5 * a_t * phi_1 * d1_0
        phi_1 = np.expm1(h)
        sig_t = ns.std(t)
        lin = np.exp(ns.log_alpha(t) - ns.log_alpha(ts[-1]))
        return lin * x - sig_t * phi_1 * ms[-1] - 0.5 * sig_t * phi_1 * d1_0

    def multistep3(self, x, ms, ts, t):
        ns = self.ns
        lam_2, lam_1, lam_0, lam_t = (ns.lam(u) for u in (ts[-3], ts[-2], ts[-1], t))
        h_1, h_0, h = lam_1 - lam_2, lam_0 - lam_1, lam_t - lam_0
        r0, r1 = h_0 / h, h_1 / h
        d1_0 = (1.0 / r0) * (ms[-1] - ms[-2])
        d1_1 = (1.0 / r1) * (ms[-2] - ms[-3])
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        if self.predict_x0:
            phi_1 = np.expm1(-h)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            a_t = np.exp(ns.log_alpha(t))
            return (
                ns.std(t) / ns.std(ts[-1]) * x
                - a_t * phi_1 * ms[-1]
                + a_t * phi_2 * d1
                - a_t * phi_3 * d2
            )
        phi_1 = np.expm1(h)
        phi_2 = phi_1 / h - 1.0
        phi_3 = phi_2 / h - 0.5
        sig_t = ns.std(t)
        return (
            np.exp(ns.log_alpha(t) - ns.log_alpha(ts[-1])) * x
            - sig_t * phi_1 * ms[-1]
            - sig_t * phi_2 * d1
            - sig_t * phi_3 * d2
        )

    def singlestep_update(self, x, s, t, order, r1=None, r2=None):
        if order == 1:
            return self.first(x, s, t)
        if order == 2:
            return self.second(x, s, t, 0.5 if r1 is None else r1)
        return self.third(x, s, t, 1 / 3 if r1 is None else r1, 2 / 3 if r2 is None else r2)

    @staticmethod
    def orders(steps, order):
        if order == 3:
            k = steps // 3 + 1
            if steps % 3 == 0:
                return [3] * (k - 2) + [2, 1]
            return [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])
        if order == 2:
            return [2] * (steps // 2) + ([1] if steps % 2 else [])
        return [1] * steps

    def sample_fast_uvit(self, x, steps, t_T, t_0):
        """U-ViT's bundled dpm_solver_pytorch: sample(..., fast_version=True) (logSNR grid)."""
        orders = self.orders(steps, 3)
        ts = self.time_steps("logSNR", t_T, t_0, len(orders))
        for i, order in enumerate(orders):
            x = self.singlestep_update(x, ts[i], ts[i + 1], order)
        return x

    def sample_singlestep(self, x, steps, order, skip, t_T, t_0):
        """Official sample(method='singlestep')."""
        orders = self.orders(steps, order)
        if skip == "logSNR":
            outer = self.time_steps(skip, t_T, t_0, len(orders))
        else:
            outer = self.time_steps(skip, t_T, t_0, steps)[np.cumsum([0] + orders)]
        for i, order in enumerate(orders):
            s, t = outer[i], outer[i + 1]
            lam_inner = self.ns.lam(self.time_steps(skip, s, t, order))
            h = lam_inner[-1] - lam_inner[0]
            r1 = None if order <= 1 else (lam_inner[1] - lam_inner[0]) / h
            r2 = None if order <= 2 else (lam_inner[2] - lam_inner[0]) / h
            x = self.singlestep_update(x, s, t, order, r1, r2)
        return x

    def sample_multistep(self, x, steps, order, skip, t_T, t_0, lower_order_final=True):
        """Official sample(method='multistep')."""
        ts_all = self.time_steps(skip, t_T, t_0, steps)
        t_prev, m_prev = [ts_all[0]], [self.model(x, ts_all[0])]
        update = {1: lambda x, m, ts, t: self.first(x, ts[-1], t, m[-1])}
        update.update({2: self.multistep2, 3: self.multistep3})
        for step in range(1, order):
            x = update[step](x, m_prev, t_prev, ts_all[step])
            t_prev.append(ts_all[step])
            m_prev.append(self.model(x, ts_all[step]))
        for step in range(order, steps + 1):
            k = min(order, steps + 1 - step) if (lower_order_final and steps < 10) else order
            x = update[k](x, m_prev, t_prev, ts_all[step])
            t_prev, m_prev = t_prev[1:] + [ts_all[step]], m_prev[1:] + [None]
            if step < steps:
                m_prev[-1] = self.model(x, ts_all[step])
        return x

"""The ops console's pages (Jinja2, autoescaped). Kept in Python so that an installed package
carries them without package data."""
from __future__ import annotations

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}Danbao ops{% endblock %} · Danbao console</title>
<style>
 body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2430;background:#f5f6f8}
 header{background:#1d2430;color:#fff;padding:8px 18px;display:flex;gap:18px;align-items:center;flex-wrap:wrap}
 header a{color:#cfe0ff;text-decoration:none} header a.brand{color:#fff;font-weight:600}
 header form{margin:0} header input[type=search]{width:22em;padding:4px 6px}
 main{padding:14px 18px;max-width:1300px}
 h1{font-size:20px;margin:6px 0 12px} h2{font-size:16px;margin:18px 0 6px}
 section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:10px 14px;margin-bottom:14px}
 table{border-collapse:collapse;width:100%} th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eceef2;vertical-align:top}
 th{font-weight:600;color:#555;font-size:12px;text-transform:uppercase} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
 .ok{color:#11702c} .warn{color:#a86400} .fail,.error{color:#b3261e}
 .badge{display:inline-block;padding:0 6px;border-radius:9px;font-size:12px;font-weight:600;background:#e8ebf0}
 .badge.ok{background:#dcf3e2} .badge.warn{background:#fdf0d5} .badge.fail{background:#fbe0de}
 .banner{padding:8px 12px;border-radius:6px;margin:0 0 12px} .banner.error{background:#fbe0de;border:1px solid #e8a39d}
 .banner.ok{background:#dcf3e2;border:1px solid #9fd3ad;color:#11502a}
 .svc{display:inline-block;min-width:58px;font-weight:600} .svc-gateway{color:#2457c5} .svc-escrow{color:#7b3fb0}
 .svc-credit{color:#0f7d72} .svc-billing{color:#a3501b}
 ol.timeline{list-style:none;padding:0;margin:0} ol.timeline li{border-left:3px solid #c9d2df;padding:3px 10px;margin-left:4px}
 ol.timeline li.k-dead-letter{border-color:#b3261e} ol.timeline li.k-timer{border-color:#a86400} ol.timeline li.k-ledger{border-color:#9aa7b8}
 ol.timeline li.k-received{border-color:#2457c5} ol.timeline li.k-published{border-color:#11702c}
 .at{color:#667;font-family:ui-monospace,monospace;font-size:12px} .kind{display:inline-block;min-width:80px;color:#555}
 pre{background:#f3f4f7;padding:6px;overflow:auto;font-size:12px;margin:4px 0}
 textarea{width:100%;font-family:ui-monospace,monospace;font-size:12px}
 button{padding:4px 12px;cursor:pointer;white-space:nowrap} details.inline{display:inline;margin-left:8px} details.inline summary{display:inline;cursor:pointer} details.inline[open]{display:block} .muted{color:#778}
 .grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(380px,1fr));gap:14px} .grid section{margin:0}
</style></head>
<body>
<header>
 <a class="brand" href="/">Danbao ops console</a>
 {% if caller %}
 <a href="/">Overview</a><a href="/dead-letters">Dead letters</a>
 <form action="/search" method="get" role="search"><input type="search" name="q" id="search" placeholder="order id or user id"
   value="{{ q or '' }}" required> <button type="submit">Search</button></form>
 <span class="muted" style="margin-left:auto">{{ caller.operator }}</span>
 <form action="/logout" method="post"><input type="hidden" name="csrf" value="{{ caller.csrf }}"><button type="submit">Log out</button></form>
 {% endif %}
</header>
<main>{% block main %}{% endblock %}</main>
</body></html>"""

LOGIN = """{% extends "base" %}{% block title %}Log in{% endblock %}{% block main %}
<h1>Log in</h1>
<section style="max-width:460px">
{% if error %}<p class="banner error" id="login-error">{{ error }}</p>{% endif %}
<form method="post" action="/login">
 <input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="next" value="{{ next }}">
 <p><label for="token">Operator token (<code>DANBAO_API_TOKEN</code>)</label><br>
 <input type="password" id="token" name="token" autocomplete="current-password" style="width:100%" required autofocus></p>
 <button type="submit" id="login">Log in</button>
</form></section>
{% endblock %}"""

CHECK = """{% macro status(s) %}<span class="badge {{ s }}">{{ s }}</span>{% endmacro %}"""

OVERVIEW = """{% extends "base" %}{% from "check" import status %}{% block title %}Overview{% endblock %}{% block main %}
<h1>Overview <span class="muted" style="font-size:13px">platform time {{ now }}</span>
 {% if report %}— needs a human: <span class="{{ 'ok' if report.ok else 'fail' }}" id="needs-human">{{ 'no' if report.ok else 'YES' }}</span>{% endif %}</h1>
{% for e in errors %}<p class="banner error">{{ e }}</p>{% endfor %}
<div class="grid">
<section id="health"><h2>Services</h2><table><tr><th>service</th><th>state</th></tr>
 {% for r in checks.get('services', {}).get('rows', []) %}<tr><td>{{ r.service }}</td>
 <td class="{{ 'ok' if r.state == 'up' else 'fail' }}">{{ r.state }}</td></tr>{% endfor %}</table></section>
<section id="sagas"><h2>Sagas by state</h2><table><tr><th>saga state</th><th>status</th><th class="num">payments</th></tr>
 {% for r in sagas %}<tr><td>{{ r.saga_state }}</td><td>{{ r.status }}</td><td class="num">{{ '{:,}'.format(r.n) }}</td></tr>
 {% else %}<tr><td colspan="3" class="muted">no payments yet</td></tr>{% endfor %}</table></section>
<section id="outbox"><h2>Outbox backlog</h2><table><tr><th>service</th><th class="num">waiting</th><th class="num">oldest (s)</th></tr>
 {% for r in checks.get('outbox backlog', {}).get('rows', []) %}<tr><td>{{ r.service }}</td><td class="num">{{ r.waiting }}</td>
 <td class="num">{{ r.oldest_seconds if r.oldest_seconds is not none else '-' }}</td></tr>{% endfor %}</table></section>
<section id="lag"><h2>Consumer lag</h2><table><tr><th>group</th><th>state</th><th>topics</th><th class="num">lag</th></tr>
 {% for g in lag %}<tr><td>{{ g.group }}</td><td>{{ g.state }}</td><td class="muted">{{ g.topics }}</td>
 <td class="num {{ 'warn' if g.lag else '' }}">{{ '{:,}'.format(g.lag) }}</td></tr>
 {% else %}<tr><td colspan="4" class="muted">no consumer groups</td></tr>{% endfor %}</table></section>
</div>
<section id="money"><h2>Money through escrow per {{ money.bucket }} (UTC, platform clock)</h2>
{% if money.rows %}
<svg width="{{ chart.width }}" height="{{ chart.height + 14 }}" role="img" aria-label="money per {{ money.bucket }}">
 {% for b in chart.bars %}<rect x="{{ b.x }}" y="{{ b.y }}" width="{{ b.w }}" height="{{ b.h }}" fill="{{ colours[b.series] }}"><title>{{ b.title }}</title></rect>{% endfor %}
 <line x1="38" y1="{{ chart.height - 20 }}" x2="{{ chart.width }}" y2="{{ chart.height - 20 }}" stroke="#999"/>
 <text x="0" y="10" font-size="10" fill="#666">{{ '{:,}'.format(chart.top) }}</text>
 {% for l in chart.labels %}<text x="{{ l.x }}" y="{{ chart.height - 6 }}" font-size="10" fill="#666">{{ l.text }}</text>{% endfor %}
</svg>
<p>{% for s in chart.series %}<span style="color:{{ colours[loop.index0] }}">■</span> {{ s }} &nbsp; {% endfor %}<span class="muted">(fen)</span></p>
<table><tr><th>{{ money.bucket }}</th>{% for s in chart.series %}<th class="num">{{ s }}</th>{% endfor %}</tr>
 {% for r in money.rows %}<tr><td>{{ r.bucket }}</td>{% for s in chart.series %}<td class="num">{{ '{:,}'.format(r[s]) }}</td>{% endfor %}</tr>{% endfor %}
 <tr><th>all time</th>{% for s in chart.series %}<th class="num">{{ '{:,}'.format(money.totals[s]) }}</th>{% endfor %}</tr></table>
{% else %}<p class="muted">escrow has moved no money yet</p>{% endif %}
</section>
<div class="grid">
<section id="audit"><h2>Audit {{ status(checks.get('audit', {}).get('status', 'fail')) }}</h2>
 <p>{{ checks.get('audit', {}).get('summary', '') }}</p>
 <table>{% for r in checks.get('audit', {}).get('rows', []) %}<tr><td>{{ r.figure }}</td><td class="num">{{ '{:,}'.format(r.fen) if r.fen is number else r.fen }}</td></tr>{% endfor %}</table></section>
<section id="doctor"><h2>Doctor</h2><table>
 {% for c in report.checks if report %}<tr><td>{{ status(c.status) }}</td><td>{{ c.name }}</td><td>{{ c.summary }}
 {% if c.status != 'ok' and c.rows and c.name not in ('services', 'audit') %}<details><summary>{{ c.rows|length }} rows</summary>
 <pre>{{ c.rows|tojson_pretty }}</pre></details>{% endif %}</td></tr>{% endfor %}</table></section>
</div>
{% endblock %}"""

ORDER = """{% extends "base" %}{% block title %}Order {{ s.order_id }}{% endblock %}{% block main %}
<h1>Order <code id="order-id">{{ s.order_id }}</code> <span class="muted" style="font-size:13px">platform time {{ when(s.now) }}</span></h1>
{% if not s.found %}<p class="banner error" id="not-found">No service knows the order or user {{ s.order_id }}.</p>{% else %}
{% if s.problems %}<section class="banner error" id="problems"><b>Problems</b><ul>{% for p in s.problems %}<li>{{ p }}</li>{% endfor %}</ul></section>
{% else %}<p class="banner ok" id="consistent">Consistent across services.</p>{% endif %}
<section id="status"><h2>Now</h2><table>
 {% for service, state in s.status.items() if service != 'escrow_refunds' %}<tr><td><span class="svc svc-{{ service }}">{{ service }}</span></td>
 <td>{% if state %}{% for k, v in state.items() if v is not none %}<span class="muted">{{ k }}</span>={{ when(v) }} {% endfor %}{% else %}-{% endif %}</td></tr>{% endfor %}
 {% for r in s.status.escrow_refunds %}<tr><td>escrow refund</td><td>{{ r.kind }} {{ r.refund_id or '(cancel)' }}: {{ r.amount }} fen {{ r.state }} {{ r.reason_code or '' }}</td></tr>{% endfor %}
</table>
{% set gw = s.status.gateway %}{% if gw %}<p>Buyer <a href="/users/{{ gw.buyer_id|urlencode }}">{{ gw.buyer_id }}</a>,
 seller <a href="/users/{{ gw.seller_id|urlencode }}">{{ gw.seller_id }}</a></p>{% endif %}</section>
<section id="timeline"><h2>Timeline ({{ s.timeline|length }} entries)</h2><ol class="timeline">
{% for e in s.timeline %}<li class="entry k-{{ e.kind }}"><span class="at">{{ when(e.at) }}</span>
 <span class="svc svc-{{ e.service }}">{{ e.service }}</span> <span class="kind">{{ e.kind }}</span>
 <span class="summary">{{ e.summary }}</span>{% if e.overdue %} <b class="fail">OVERDUE</b>{% endif %}
 {% if e.detail %}<details class="inline"><summary class="muted">detail</summary><pre>{{ e.detail|tojson_pretty }}</pre></details>{% endif %}</li>
{% endfor %}</ol></section>{% endif %}
{% endblock %}"""

USER = """{% extends "base" %}{% block title %}User {{ s.user_id }}{% endblock %}{% block main %}
<h1>User <code id="user-id">{{ s.user_id }}</code></h1>
{% if not s.found %}<p class="banner error" id="not-found">The gateway does not know this user.</p>{% else %}
{% if s.problems %}<section class="banner error" id="problems"><ul>{% for p in s.problems %}<li>{{ p }}</li>{% endfor %}</ul></section>
{% else %}<p class="banner ok" id="consistent">Consistent.</p>{% endif %}
<div class="grid">
<section><h2>Profile</h2><table>{% for k, v in s.user.items() %}<tr><td class="muted">{{ k }}</td><td>{{ when(v) }}</td></tr>{% endfor %}</table></section>

<section><h2>Held in escrow ({{ s.holds|length }})</h2><table>{% for h in s.holds %}<tr><td><a href="/orders/{{ h.order_id|urlencode }}">{{ h.order_id }}</a></td>
 <td>{{ h.role }}</td><td class="num">{{ '{:,}'.format(h.amount) }}</td><td class="at">auto-confirm {{ when(h.auto_confirm_at) }}</td></tr>{% endfor %}</table></section>
<section><h2>Huabei</h2>{% if s.huabei %}<p>{{ s.huabei.status }}, limit {{ '{:,}'.format(s.huabei.credit_limit) }}, used {{ '{:,}'.format(s.huabei.used) }},
 reserved {{ '{:,}'.format(s.huabei.reserved) }} fen, score {{ s.huabei.score }}</p>{% else %}<p class="muted">not active</p>{% endif %}
 {% if s.statements is mapping %}<p class="error">{{ s.statements.error }}</p>{% elif s.statements %}<table><tr><th>statement</th><th>period</th><th>due</th><th class="num">outstanding</th><th>status</th></tr>
 {% for st in s.statements %}<tr><td>{{ st.statement_id }}</td><td>{{ st.period }}</td><td>{{ st.due_on }}</td><td class="num">{{ st.outstanding }}</td><td>{{ st.status }}</td></tr>{% endfor %}</table>{% endif %}</section>
</div>
<section id="wallet"><h2>Wallet</h2>{% if s.wallet %}<p>available <b>{{ '{:,}'.format(s.wallet.available) }} fen</b>, in flight {{ '{:,}'.format(s.wallet.pending) }} fen</p>
 <table><tr><th>at</th><th class="num">fen</th><th>code</th><th>kind</th><th>order</th></tr>
 {% for t in s.wallet.recent_transfers %}<tr><td class="at">{{ when(t.created_at) }}</td>
 <td class="num">{{ '-' if t.debit_account == s.wallet.account else '+' }}{{ '{:,}'.format(t.amount) }}</td><td>{{ t.code }}</td><td>{{ t.kind }}</td>
 <td>{% if t.order_id %}<a href="/orders/{{ t.order_id|urlencode }}">{{ t.order_id }}</a>{% endif %}</td></tr>{% endfor %}</table>
 {% else %}<p class="muted">no wallet yet</p>{% endif %}</section>
<section id="payments"><h2>Recent payments ({{ s.payments|length }})</h2><table><tr><th>accepted</th><th>order</th><th>role</th><th class="num">fen</th><th>method</th><th>status</th><th>saga</th></tr>
 {% for p in s.payments %}<tr><td class="at">{{ when(p.accepted_at) }}</td><td><a href="/orders/{{ p.order_id|urlencode }}">{{ p.order_id }}</a></td><td>{{ p.role }}</td>
 <td class="num">{{ '{:,}'.format(p.amount) }}</td><td>{{ p.payment_method }}{% if p.installments %} ×{{ p.installments }}{% endif %}</td><td>{{ p.status }} {{ p.reason_code or '' }}</td><td>{{ p.saga_state }}</td></tr>{% endfor %}</table></section>
{% if s.repayments %}<section><h2>Repayments</h2><table>{% for r in s.repayments %}<tr><td class="at">{{ when(r.created_at) }}</td><td>{{ r.repayment_id }}</td>
 <td class="num">{{ '{:,}'.format(r.amount) }}</td><td>{{ r.source }}</td><td>{{ r.state }}</td></tr>{% endfor %}</table></section>{% endif %}
{% endif %}
{% endblock %}"""

DEAD_LETTERS = """{% extends "base" %}{% block title %}Dead letters{% endblock %}{% block main %}
<h1>Dead letters ({{ total }}, {{ open }} not replayed)</h1>
{% if letters|length < total %}<p class="muted">The newest {{ letters|length }} are shown, newest first: <a href="/dead-letters?all=1">show all</a>.</p>{% endif %}
{% for e in errors %}<p class="banner error">{{ e }}</p>{% endfor %}
<section><table id="dead-letters"><tr><th>position</th><th>dead-lettered</th><th>error</th><th>type</th><th>key</th><th>replay</th></tr>
{% for d in letters|reverse %}<tr class="letter" data-position="{{ d.position }}">
 <td><a href="/dead-letters/{{ d.position|urlencode }}">{{ d.position }}</a></td><td class="at">{{ when(d.at) }}</td>
 <td><b class="error">{{ d.code or '-' }}</b><br><span class="muted">{{ (d.message or '')[:200] }}</span></td>
 <td>{{ d.type or '?' }}</td><td>{% if d.key %}<a href="/search?q={{ d.key|urlencode }}">{{ d.key }}</a>{% endif %}</td>
 <td>{% if d.replay %}<span class="ok">replayed</span> <span class="muted">by {{ d.replay.operator }} {{ when(d.replay.replayed_at) }}</span>
 {% else %}<form method="post" action="/dead-letters/{{ d.position|urlencode }}/replay" style="display:inline">
 <input type="hidden" name="csrf" value="{{ caller.csrf }}"><button type="submit" class="replay">Replay as is</button></form>
 <a href="/dead-letters/{{ d.position|urlencode }}">edit…</a>{% endif %}</td></tr>
{% else %}<tr><td colspan="6" class="muted">no dead letters</td></tr>{% endfor %}</table></section>
{% endblock %}"""

DEAD_LETTER = """{% extends "base" %}{% block title %}Dead letter {{ position }}{% endblock %}{% block main %}
<h1>Dead letter <code>{{ position }}</code></h1>
{% if error %}<p class="banner error" id="replay-error"><b class="code">{{ error.code }}</b>: {{ error.message }}</p>{% endif %}
{% if result %}<p class="banner ok" id="replay-ok">Replayed to {{ result.topic }} partition {{ result.partition }} offset {{ result.offset }}
 (event {{ result.event_id }}{{ ', edited' if result.edited }}).
 {% if d and d.key %}<a href="/search?q={{ d.key|urlencode }}">Follow {{ d.key }}</a>{% endif %}</p>{% endif %}
{% if d %}
<section><table>
 <tr><td class="muted">error</td><td><b class="error">{{ d.code }}</b> {{ d.message }}</td></tr>
 <tr><td class="muted">from</td><td>{{ d.original_topic }} partition {{ d.original_partition }} offset {{ d.original_offset }}</td></tr>
 <tr><td class="muted">key</td><td>{% if d.key %}<a href="/search?q={{ d.key|urlencode }}">{{ d.key }}</a>{% endif %}</td></tr><tr><td class="muted">dead-lettered</td><td>{{ when(d.at) }}</td></tr>
 {% if d.replay_of %}<tr><td class="muted">replay of</td><td>{{ d.replay_of }}</td></tr>{% endif %}
 <tr><td class="muted">headers</td><td><pre>{{ d.headers|tojson_pretty }}</pre></td></tr></table></section>
<section><h2>{% if replay %}Replayed{% else %}Replay{% endif %}</h2>
{% if replay %}<p id="replayed">Replayed to {{ replay.topic }} by {{ replay.operator }} at {{ when(replay.replayed_at) }}
 (event {{ replay.event_id }}{{ ', edited' if replay.edited }}). A dead letter is replayed once.</p>{% endif %}
<form method="post" action="/dead-letters/{{ position|urlencode }}/replay">
 <input type="hidden" name="csrf" value="{{ caller.csrf }}">
 <p>The record as it will be sent to <b>{{ d.original_topic }}</b>, with its key and headers; fix it here if needed.
 The consumer's own validation runs first.</p>
 <textarea name="value" id="value" rows="{{ [value.count('\n') + 3, 30]|min }}" spellcheck="false">{{ value }}</textarea>
 <p><button type="submit" id="replay">Replay</button></p>
</form></section>
{% endif %}
{% endblock %}"""

ERROR = """{% extends "base" %}{% block title %}Unavailable{% endblock %}{% block main %}
<h1>This page cannot be shown now</h1><p class="banner error" id="unavailable">{{ error }}</p>
<p class="muted">The console reads the services' databases and Kafka directly: is the platform up? <code>./danbao status</code></p>
{% endblock %}"""

TEMPLATES = {"error": ERROR, "base": BASE, "login": LOGIN, "check": CHECK, "overview": OVERVIEW, "order": ORDER, "user": USER,
             "dead_letters": DEAD_LETTERS, "dead_letter": DEAD_LETTER}

"""Deterministic demo dataset: support tickets and reviews of fictional people, with planted copies.

``write_demo(dir, n, seed)`` streams ``records.jsonl`` (``id, text, label, email, user_id,
name``; single-line texts) and ``ground_truth.jsonl``; ``generate_demo`` gives the same rows in
memory. ``label`` is the topic (``LABELS``), learnable from the words. Originals carry their
author's identifiers and usually name them in the text (an intro before the body, a signature
after it). A few persons (``subject_rate``) have copies of their posts planted under other ids,
with no identifier fields and no identifiers in the text:

* ``exact``: byte-identical to the original's *body*, i.e. its text minus the greeting/intro
  prefix and the closing/signature suffix (identical to the whole text when it has neither);
* ``near``: case/punctuation/whitespace noise and word edits, tuned so that the Jaccard to the
  original spans ~0.45-0.95 (about 60% at 0.8 or more, the rest mostly 0.5-0.8);
* ``paraphrase``: the same facts (numbers, products, places) in other wordings and synonyms,
  sentences reordered: Jaccard near 0, embeddings still close.

Every copy's ``jaccard`` is measured against the original's full text on word 5-grams after
:func:`_normalize_text` (NFKC, casefold, each run of ``[\\W_]`` -> one space, strip); see
:func:`_shingles`. Same parameters -> same bytes, whatever the number of worker processes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import re
import threading
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

LABELS = ("billing", "delivery", "account", "product_review", "app_bug", "travel")
_LABEL_P = np.array([0.2, 0.19, 0.17, 0.18, 0.14, 0.12])
_KINDS = ("exact", "near", "paraphrase")
_KIND_SHARE = (0.3, 0.45, 0.25)
_BATCH = 8192  # records per random stream; fixed so that the output never depends on batching
_NONWORD = re.compile(r"[\W_]+")
_ASCII_FOLD = str.maketrans({c: " " for c in map(chr, range(128)) if not c.isalnum()})


def _normalize_text(text: str) -> str:
    if text.isascii():  # the same result, faster
        return " ".join(text.lower().translate(_ASCII_FOLD).split())
    return _NONWORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _shingles(text: str, k: int = 5) -> set[str]:
    words = _normalize_text(text).split()
    if len(words) <= k:
        return {" ".join(words)} if words else set()
    return set(map(" ".join, zip(*(words[i:] for i in range(k)))))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


# ---------------------------------------------------------------- vocabulary
_FIRST = """Aaron Abigail Adrian Agnes Aidan Alba Alec Alina Alvaro Amara Anders Anika Anton Arjun
Astrid Aurelio Bastian Beatrix Benedikt Bianca Bjorn Blanca Bram Brenna Caius Camila Casimir Celia
Cillian Clara Cosmin Dagny Dalia Damian Dario Delphine Dmitri Dorota Edgar Edith Eitan Elif Elio
Emeric Enya Ezra Fabian Farah Felix Fenna Filip Fiona Florin Freya Gael Galina Gideon Greta Gunnar
Hamid Hanna Hector Helga Henrik Ilse Imani Ines Ingrid Isak Ivana Jagoda Jalen Janek Jelena Joaquin
Jonas Jovana Kaito Kalina Kasimir Katja Keanu Kiran Klaas Kofi Lajos Lara Leander Leona Linnea Lorcan
Lucian Ludmila Maeve Mali Marek Marisol Mateo Mattias Milena Mirza Nadia Nikolai Nilufar Noor Odile
Oisin Olek Oriana Osric Paola Pavel Petra Quentin Rafaela Ragnar Rahel Renata Rohan Roisin Rune Saoirse
Selim Signe Silvio Sinead Soren Stellan Svea Tadeo Tamsin Teodor Thea Tobiah Ulla Umberto Vadim Valka
Vesna Wilhelm Xenia Yannick Yara Yusuf Zelda Zofia Zoran""".split()
_LAST = """Abernathy Adeyemi Albrecht Alcott Andersen Arkwright Ashdown Bakshi Balogun Barrow Beaumont
Bellweather Bergstrom Blackwood Bogdan Bramley Brennan Calloway Castellano Chaudry Cibulka Corrigan
Crandall Dabrowski Dalgleish Delacroix Demir Dorsey Draganov Dunmore Eberhardt Ekwueme Ellingsen
Esposito Fairbairn Falkner Ferreira Fitzroy Fonseca Galbraith Gallo Garnier Gilchrist Grimaldi
Gudmundsson Hadley Halloran Hartigan Haverford Holmqvist Horvath Iglesias Ivanova Jablonski Jansen
Jovanovic Kaczmarek Kallio Kavanagh Kemper Kowalczyk Krauss Lachance Lambrecht Lindqvist Lombardi
Lundgren Macaulay Madsen Mancini Marchetti Medina Mendel Moreau Mulcahy Nakamura Navarro Nordin
Novak Nyberg Obuya Okafor Olander Oyelaran Pacheco Pellegrini Petrov Pichler Quaresma Radcliffe
Rasmussen Reinholt Rinaldi Rosenthal Rudnicki Salazar Santangelo Scholz Sefton Silvestri Sokolov
Stavros Strand Szabo Takahashi Tavares Thornbury Toivonen Urquhart Valdez Vasquez Vogel Wainwright
Wakefield Westergaard Whitlock Wojcik Yamada Yilmaz Zamora Zielinski Zubiri""".split()
_DOMAINS = ("example.com", "example.org", "example.net")
_BRANDS = """Veltra Korvo Nimbra Ostrel Pallix Quorra Ravelo Sundri Tavik Umbro Vexel Wyntra Zorla Brevo
Caldra Delvin Erix Fenwo Galdor Hestia Ilvo Jandro Kestra Lumio Marvo Norvik Orvane Pexa Quilo Rendo
Solvik Trevo Ulmar Varto Wexo Xandri Yelvo Zentra Arvo Blyth""".split()
_CITIES = """Aberdeen Antwerp Arhus Bergen Bilbao Bologna Bordeaux Bremen Brno Cardiff Cork Cluj Debrecen
Dresden Dundee Eindhoven Faro Gdansk Ghent Genoa Graz Groningen Hamburg Innsbruck Kaunas Krakow Leeds
Leipzig Lille Linz Lodz Lyon Malaga Malmo Marseille Nantes Naples Nice Oporto Oulu Palermo Plovdiv
Poznan Rennes Riga Rotterdam Salzburg Seville Split Tampere Tartu Toulouse Trieste Turin Utrecht
Valencia Varna Verona Vilnius Wroclaw York Zagreb Zaragoza""".split()
_COURIERS = """SwiftPost ParcelLink QuickDrop FleetMail NorthShip RapidRoute BoxRunner CityHop Transwell
PakExpress Movvi ShipNest""".split()
_STORES = """ShopNest MegaMart Cartwell BuyDirect Gadgetry HomeHub Trendo MarketLane ValueCorner Urbanly
PrimeBasket Stockwise""".split()
_FEATURES = ("the calendar", "camera upload", "offline mode", "the search bar", "PDF export", "the widget",
             "photo backup", "the chat tab", "the map view", "voice notes", "the dashboard", "file sharing")
_HOTEL = ("Inn", "Suites", "Grand Hotel", "Lodge", "Residence", "Boutique Hotel", "Resort")
_MONTHS = "January February March April May June July August September October November December".split()
_DEVICES = ("Nexa", "Tabri", "Pulse", "Vantix", "Lumen", "Corva")


def _g(spec: str) -> tuple[tuple[str, ...], ...]:
    """'a/b, c/d' -> synonym groups (('a', 'b'), ('c', 'd'))."""
    return tuple(tuple(w.strip() for w in grp.split("/")) for grp in spec.split(","))


_SYN = {k: _g(v) for k, v in {
    "bad": "terrible/awful/dreadful, disappointing/underwhelming, unacceptable/inexcusable, ridiculous/absurd,"
           " frustrating/maddening, poor/shoddy",
    "good": "helpful/kind/friendly, decent/fine/okay, great/excellent, polite/courteous, patient/calm",
    "quality": "decent/solid/fine, great/excellent/superb, surprisingly good/better than expected",
    "annoyed": "annoyed/irritated/frustrated, upset/unhappy, fed up/sick of this, angry/furious",
    "really": "really/truly/genuinely, honestly/frankly, quite/pretty, absolutely/totally",
    "asap": "as soon as possible/right away/without delay, this week/within the week, today/by today",
    "contacted": "contacted/reached out to/got in touch with, phoned/called, emailed/wrote to, messaged/pinged",
    "problem": "problem/headache/nightmare, bug/glitch/fault, mess/fiasco",
    "bought": "bought/purchased/picked up, ordered/got",
    "broke": "broke/stopped working/died, fell apart/came apart, cracked/split",
    "damaged": "broken/damaged/smashed, not working/dead/useless, faulty/defective",
    "refund": "refund/reimbursement/full refund, credit/store credit, chargeback/reversal",
    "staff": "support/customer service/help desk, agent/representative/rep, team/staff/people",
    "still": "still/even now, yet again/once more",
    "fix": "fixed/resolved/sorted out, looked into/investigated/checked",
    "relation": "my partner/my spouse, my colleague/my coworker, my neighbour/the neighbour next door,"
                " my sister/my sis, my brother/my bro, a friend/a mate, my dad/my father, my mum/my mother",
}.items()}
_TOPIC_SYN = [{k: _g(v) for k, v in d.items()} for d in (
    {"item": "subscription/membership/plan, contract/service contract",
     "thing": "charge/payment/transaction, fee/surcharge"},
    {"item": "package/parcel/shipment, box/carton", "thing": "driver/courier/delivery guy, carrier/shipper"},
    {"item": "password/passcode/login password, PIN/PIN code",
     "thing": "account/profile/login, user account/account page"},
    {"item": "headphones/earbuds/headset, blender/mixer, backpack/bag/rucksack, kettle/water boiler,"
             " jacket/coat, vacuum/vacuum cleaner, lamp/light, drill/power drill",
     "thing": "finish/coating/surface, handle/grip, zipper/zip, cable/cord/lead, lid/cover, strap/belt"},
    {"item": "update/upgrade/new release, patch/hotfix", "thing": "app/application/program, screen/window/page"},
    {"item": "room/suite, studio/flat, double room/twin room", "thing": "receptionist/front desk/clerk, manager/host"},
)]

# drawn afresh for each sentence; every other slot (product, order, city, ...) is fixed per text
_PER_SENTENCE = ("days", "n", "n2", "hours", "pct", "time", "year", "money2", "date2", "code2",
                 "bad", "good", "quality", "really", "annoyed", "still", "problem", "staff", "fix", "relation")
# One template group per line: "topic: variant | variant" (same facts, other wording).
_TEMPLATE_SPEC = """
0: I was charged {money} twice for my {plan} {item} on {date}. | On {date} my card was billed {money} two times for the {plan} {item}.
0: My {card} shows a pending {thing} of {money} that I never authorised. | There is a {thing} of {money} on my {card} that I did not approve.
0: I cancelled the {item} on {date2} but you {still} took {money2} this month. | Even though I ended the {item} on {date2}, {money2} was taken {still} this month.
0: The {thing} on invoice {order} does not match the price of {money} on your website. | Your site listed {money}, not the {thing} shown on invoice {order}.
0: Please send me a {refund} of {money} {asap}. | I would like {money} back as a {refund} {asap}.
0: I have {contacted} billing {n} times about the {thing} and nothing got {fix}. | {n} times I {contacted} billing about this {thing}, nothing was {fix}.
0: Why did my {plan} price go up by {pct} without any notice? | My {plan} got {pct} more expensive and nobody told me.
0: The promo code {code} was not applied to order {order}. | Order {order} was charged in full, the code {code} never applied.
0: I switched to annual billing in {year} and expected {money2} per year. | Since {year} I am on yearly billing, which should cost {money2}.
0: My bank says the {thing} of {money2} came from {store}, not from you. | According to my bank, {store} took the {money2} {thing}, not your company.
0: Your {plan} tier lists {n} seats but I am billed for {n2}. | I am billed for {n2} seats although the {plan} tier has {n}.
1: I ordered the {product} on {date} and the {item} has {still} not arrived. | The {item} with my {product}, ordered on {date}, has {still} not shown up.
1: Tracking for {order} has said out for delivery for {days} days. | For {days} days the tracking of {order} has shown out for delivery.
1: The {thing} from {courier} left it at the wrong address in {city}. | {courier} delivered it to a wrong address in {city}, says the {thing}.
1: When it finally came on {date2} the box was crushed and the {product} was {damaged}. | The box arrived crushed on {date2} and the {product} inside was {damaged}.
1: I paid {money} for express shipping and it took {days} days. | Express shipping cost me {money} yet it needed {days} days.
1: The {thing} claimed nobody was home at {time} but I was waiting by the door. | At {time} I was at home, yet the {thing} marked it as no one home.
1: Can you resend the {item} or give me a {refund} for {order}? | Either ship the {item} of {order} again or give me a {refund}, please.
1: Last week {relation} in {city2} got a {item} meant for me. | A {item} meant for me ended up with {relation} in {city2} last week.
1: {n} items were missing from {order}, only the {product} was inside. | Only the {product} was in the box and {n} other items of {order} were missing.
1: The estimated date was {date}, now your site says {date2}. | First you promised {date}, now the page shows {date2}.
1: I {contacted} {courier} and they told me to ask you instead. | {courier} sent me back to you when I {contacted} them.
1: This is late delivery number {n2} since {year}, which is {really} {bad}. | Since {year} this has happened {n2} times, {really} {bad}.
2: I cannot log in to my {thing} since {date}, it says my {item} is wrong. | Since {date} I am unable to sign in to my {thing} and the {item} is rejected.
2: The verification code never arrives by text or email, I tried {n} times. | I tried {n} times but no one-time code ever reaches my phone or inbox.
2: My {thing} was locked after {n2} failed attempts at {time}. | At {time} the {thing} got locked after {n2} wrong tries.
2: Someone changed my recovery email on {date2} and it was not me. | On {date2} my recovery email was changed by somebody else.
2: I see logins from {city} on a {device}, I have never been to {city}. | There are sign-ins from {city} using a {device} and I have never been there.
2: The reset link expires after about {n2} minutes, before I can even open it. | After roughly {n2} minutes the reset link is already expired.
2: Please delete the old {thing} I made in {year} and merge my orders. | I made a second {thing} in {year}, please merge it and remove the old one.
2: Two-factor keeps asking for a code on my {device} every {hours} hours. | Every {hours} hours my {device} asks me again for the two-factor code.
2: My {item} was changed on {date} without my permission. | Without my permission somebody altered my {item} on {date}.
2: I opened {ticket} about my {thing} and got no answer in {days} days. | {days} days ago I opened {ticket} about the {thing} and nobody replied.
2: Not being able to access my own {thing} is {really} {bad}. | It is {really} {bad} that I cannot get into my own {thing}.
2: I updated to version {version} and the login screen just spins. | Since version {version} the sign-in page spins forever.
3: I {bought} the {product} on {date} for {money}. | For {money} I {bought} the {product} back on {date}.
3: After {days} days the {item} {broke} completely. | Within {days} days the {item} {broke} for good.
3: The {thing} feels cheap and started peeling after {n} uses. | After just {n} uses the {thing} was peeling and felt cheap.
3: Build and sound are {quality} for {money2}, I will give it that. | For {money2} the build and sound are {quality}, to be fair.
3: {brand} claims a battery life of {hours} hours, I get maybe half. | Battery life is nowhere near the {hours} hours {brand} advertises.
3: The {item} is {pct} smaller than the photos suggest. | Compared to the photos the {item} is about {pct} smaller.
3: The model from {year} that {relation} owns {still} works fine. | The {year} model that {relation} has {still} runs fine.
3: I would give it {n} stars out of ten, mostly for the {thing}. | {n} out of ten from me, largely thanks to the {thing}.
3: The {staff} offered a replacement but wanted {money2} for shipping. | They offered a replacement, but the {staff} asked {money2} for shipping.
3: Do not buy the {product} if you expect it to last past {year}. | If you need something lasting beyond {year}, skip the {product}.
3: The manual says model {model} but the box says {model2}. | Box and manual disagree, {model2} on one and {model} on the other.
3: Overall a {really} {bad} purchase from {store}. | All in all, buying it at {store} was {really} {bad}.
4: Since the {item} to version {version} the app crashes when I open {feature}. | The app has crashed on opening {feature} ever since the {item} to version {version}.
4: I get error {code} every time I try to sync on my {device}. | Syncing on my {device} always fails with error {code}.
4: It {still} happens after reinstalling {n} times and clearing the cache. | Reinstalling {n} times and clearing the cache did not help, it {still} happens.
4: The {thing} freezes for about {n2} seconds and then closes. | After freezing for roughly {n2} seconds the {thing} shuts down.
4: Notifications from {feature} arrive {hours} hours late or not at all. | I get {feature} notifications up to {hours} hours late, if ever.
4: My saved data from {date} is gone after the last {item}. | After the latest {item} everything I saved on {date} disappeared.
4: Dark mode resets every time on my {device} with the {version} build. | On my {device} with build {version} dark mode keeps resetting.
4: Battery drain went up by {pct} since {date2}, the app is the top consumer. | Since {date2} the app eats {pct} more battery than before.
4: I reported this in {ticket} and your {staff} said it was {fix}. | Your {staff} told me {ticket} was {fix}, but it is not.
4: Please roll back the {item} or let us turn {feature} off. | Either revert the {item} or let us disable {feature}.
4: On the office network in {city} I only get error {code2}. | Error {code2} is all I see on our {city} office network.
4: For an app I pay {money} a month for, this is {really} {bad}. | I pay {money} monthly and the app is {really} {bad}.
5: We booked a {item} at {hotel} in {city} for {n} nights from {date}. | From {date} we had a {item} at {hotel} in {city} for {n} nights.
5: Check-in took {hours} hours because the {thing} had lost our booking. | The {thing} lost our booking, so check-in took {hours} hours.
5: The {item} smelled of smoke and the air conditioning was {damaged}. | Air conditioning {damaged} and a smoky smell in the {item}.
5: Our {flight} was delayed by {n2} hours and we missed the transfer. | We missed the transfer because {flight} left {n2} hours late.
5: We paid {money} for breakfast and the buffet was empty by {time}. | By {time} the breakfast we paid {money} for was gone.
5: The pool in the photos was closed for all {days} days of our stay. | For {days} days we could not use the pool shown in the photos.
5: The {thing} was {good} and moved us to another {item} on {date2}. | On {date2} they moved us to a new {item}, the {thing} was {good} about it.
5: Cancellation was free until {date2}, yet you charged {money2}. | You charged {money2} even though cancelling was free up to {date2}.
5: Since {year} {relation} and I have stayed in {city2} and never seen this. | We have visited {city2} since {year}, {relation} and I, and never had this.
5: The airport shuttle never showed up at {time}. | No shuttle came to the airport at {time} as promised.
5: Wifi worked for maybe {pct} of the stay, useless for remote work. | About {pct} of the time the wifi worked, not enough for work.
5: I would {still} rate it {n} out of ten for the location near {city}. | The location near {city} {still} earns {n} out of ten.
*: I have been a customer since {year} and never had a {problem} like this. | Never had a {problem} like this in all my years since {year}.
*: I am {really} {annoyed} and I expect an answer {asap}. | Please answer {asap}, I am {really} {annoyed}.
*: I already {contacted} your {staff} on {date} and again on {date2}. | On {date} and again on {date2} I {contacted} your {staff}.
*: The reference number is {ticket} if that helps. | If it helps, the reference is {ticket}.
*: I wasted about {hours} hours on this {problem} so far. | So far this {problem} has cost me around {hours} hours.
*: Last month {relation} had the same {problem}. | The same {problem} hit {relation} last month.
*: I have screenshots from {time} on {date} if you need them. | Screenshots taken at {time} on {date} are available if needed.
*: If this is not {fix} by {date2} I will dispute it. | I will escalate on {date2} unless it is {fix}.
*: Honestly I expected better from {store}. | I thought {store} was better than this, honestly.
*: To be fair, chat agent number {n2} was {good}. | In fairness, chat agent {n2} was {good}.
*: My phone is a {device} and I live near {city2}, in case that matters. | In case it matters, I am near {city2} and use a {device}.
"""


def _pool(draw, size: int = 4096) -> tuple[str, ...]:
    """``size`` values of ``draw(rnd)``, fixed at import: a draw is then one index."""
    rnd = random.Random(size).random
    return tuple(draw(rnd) for _ in range(size))


def _rng(lo: int, hi: int, fmt: str = "{}") -> tuple[str, ...]:
    return _pool(lambda r: fmt.format(lo + int(r() * (hi - lo))))


def _letter(r) -> str:
    return chr(65 + int(r() * 26))


_VALUES = {
    "money": _pool(lambda r: f"${5 + int(r() * 895)}.{int(r() * 100):02d}"),
    "date": _pool(lambda r: f"{_MONTHS[int(r() * 12)]} {1 + int(r() * 28)}" if r() < 0.6
                  else f"{1 + int(r() * 28)} {_MONTHS[int(r() * 12)]}"),
    "days": _rng(2, 30), "n": _rng(2, 10), "n2": _rng(3, 60), "hours": _rng(2, 49), "pct": _rng(5, 80, "{}%"),
    "year": _rng(2009, 2025), "order": _rng(1_000_000, 99_999_999, "#{}"),
    "ticket": _rng(10_000, 999_999, "ticket {}"), "card": _rng(1000, 10_000, "card ending in {}"),
    "time": _pool(lambda r: f"{1 + int(r() * 12)}:{int(r() * 60):02d} {'am' if r() < 0.5 else 'pm'}"),
    "code": _pool(lambda r: f"{'EWX'[int(r() * 3)]}-{100 + int(r() * 9900)}"),
    "version": _pool(lambda r: f"{1 + int(r() * 11)}.{int(r() * 30)}.{int(r() * 10)}"),
    "model": _pool(lambda r: f"{_letter(r)}{10 + int(r() * 990)}"),
    "device": _pool(lambda r: f"{_DEVICES[int(r() * len(_DEVICES))]} {2 + int(r() * 13)}", 64),
    "flight": _pool(lambda r: f"flight {_letter(r)}{_letter(r)} {100 + int(r() * 9900)}"),
    "brand": tuple(_BRANDS), "city": tuple(_CITIES), "courier": tuple(_COURIERS), "store": tuple(_STORES),
    "feature": _FEATURES, "plan": ("Basic", "Plus", "Family", "Pro", "Premium", "Student"),
}
for _k in ("money", "date", "city", "code", "model"):
    _VALUES[_k + "2"] = _VALUES[_k]


def _pools(values: dict[str, tuple]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """key -> (pool for the original wording, pool for the paraphrase): synonyms shift by one."""
    out = {k: (v, v) for k, v in values.items()}
    for k, groups in values.items():
        if groups and isinstance(groups[0], tuple):
            out[k] = tuple(tuple(g[(i + alt) % len(g)] for g in groups for i in range(len(g))) for alt in (0, 1))
    return out


_COMMON = _pools({**_VALUES, **_SYN})
_TOPIC_POOLS = [{**_COMMON, **_pools(t)} for t in _TOPIC_SYN]
# Each text draws one row of _WIDTH random ints. Every draw has a fixed place in it, so a
# paraphrase (same row, alt=1) gets the same facts in whatever order its wording uses them.
# Columns 0-1: length; 2, 4: which templates in which order; 6-10: where the generic ones go;
# 11-12: frame; 13: hotel; one per record-level slot; then one 63-bit int per sentence (_compile).
_RECORD_KEYS = sorted(k for k in _TOPIC_POOLS[0] if k not in _PER_SENTENCE)
_HEAD = 14 + len(_RECORD_KEYS)
_MAX_SENTENCES = 16
_WIDTH = _HEAD + _MAX_SENTENCES
_HIGH = np.array([2**30] * _HEAD + [2**63 - 1] * _MAX_SENTENCES, dtype=np.int64)


# plain words of the templates that vary per sentence too (fewer 5-grams shared by chance)
_WORDS = {w: g for g in _g(
    "phone/mobile/cell, photos/pictures/pics, email/e-mail, wifi/wi-fi/internet, minutes/mins, cache/app cache,"
    " stay/visit/trip, booking/reservation, wrong/incorrect, shuttle/shuttle bus, door/front door, website/site,"
    " cheap/flimsy, shipping/postage, location/area, transfer/connection, somebody/someone, every/each,"
    " again/once more, finally/eventually, maybe/perhaps, completely/entirely, crushed/squashed/dented,"
    " missing/absent, closed/shut, delayed/held up, expired/invalid, resets/switches off, freezes/hangs,"
    " locked/blocked, permission/consent, smaller/tinier, cancelled/stopped, notice/warning, inside/in there,"
    " reference/case, screenshots/screen captures, customer/client, instead/directly") for w in g}


def _compile(variant: str, local: list[str], alt: int):
    """``variant`` as a function (record values, sentence draw x) -> sentence, via an f-string.

    Bits of x: 0-2 the wording, 3 + 12j the j-th per-sentence slot, 51 + 3i the i-th varied word.
    """
    env: dict = {}

    def slot(m: re.Match) -> str:
        key, word = m.groups()
        if word:
            group, i = _WORDS.get(word), sum(n.startswith("_w") for n in env)
            if group is None or i == 4:
                return word
            env[f"_w{i}"] = tuple(group[(k + alt) % len(group)] for k in range(len(group)))
            return "{_w%d[((x >> %d) & 7) %% %d]}" % (i, 51 + 3 * i, len(group))
        if key not in local:
            return "{r[%r]}" % key
        env["_" + key] = pool = _COMMON[key][alt]
        return "{_%s[(x >> %d) %% %d]}" % (key, 3 + 12 * local.index(key), len(pool))

    source = re.sub(r"{(\w+)}|\b([a-z][a-z-]*)\b", slot, variant)
    return eval(f"lambda r, x: f'''{source}'''", env)  # noqa: S307 - our own template constants


_USED: dict[int | None, set[str]] = {}  # slot keys used by each topic's templates (None: generic ones)


def _parse_templates() -> tuple[list[list[tuple]], list[tuple]]:
    """Template groups: per alt (0: original, 1: paraphrase), the compiled variants."""
    topic: list[list[tuple]] = [[] for _ in LABELS]
    generic: list[tuple] = []
    for line in _TEMPLATE_SPEC.strip().splitlines():
        where, _, rest = line.partition(": ")
        variants = [v.strip() for v in rest.split(" | ")]
        keys = sorted(set(re.findall(r"{(\w+)}", variants[0])))
        assert len(variants) >= 2 and all(sorted(set(re.findall(r"{(\w+)}", v))) == keys for v in variants), line
        local = [k for k in keys if k in _PER_SENTENCE]
        assert len(local) <= 4 and "'" not in rest, line
        group = tuple(tuple(_compile(v, local, alt) for v in variants) for alt in (0, 1))
        (generic if where == "*" else topic[int(where)]).append(group)
        _USED.setdefault(None if where == "*" else int(where), {"brand", "model", "item", "city2"}).update(keys)
    return topic, generic


_TOPIC_T, _GENERIC_T = _parse_templates()
# per topic and alt: (key, pool, pool size, column) of the record-level slots its templates use
_RECORD_SPEC = [[tuple((k, pools[k][alt], len(pools[k][alt]), 14 + i) for i, k in enumerate(_RECORD_KEYS)
                       if k in _USED[t] | _USED[None]) for alt in (0, 1)] for t, pools in enumerate(_TOPIC_POOLS)]


def _row(rng: np.random.Generator, k: int) -> np.ndarray:
    return rng.integers(0, _HIGH, size=(k, _WIDTH), dtype=np.int64)


def _sample(seq: list, k: int, x: int) -> list:
    """k distinct items of seq in random order: a partial Fisher-Yates shuffle driven by the digits of x."""
    seq = list(seq)
    for i in range(k):
        x, j = divmod(x, len(seq) - i)
        seq[i], seq[i + j] = seq[i + j], seq[i]
    return seq[:k]


def _body(u: list[int], topic: int, alt: int) -> list[str]:
    """The body sentences of the text with random row ``u``; ``alt=1``: the paraphrase's wording."""
    n = 5 + (u[0] % 12) * (u[1] % 12) // 11
    n_topic = min(len(_TOPIC_T[topic]), round(n * 0.7))
    picks = _sample(_TOPIC_T[topic], n_topic, u[2])
    for i, group in enumerate(_sample(_GENERIC_T, n - n_topic, u[4])):
        picks.insert(1 + u[6 + i] % len(picks), group)
    rec = {k: pool[u[c] % size] for k, pool, size, c in _RECORD_SPEC[topic][alt]}
    rec["product"] = f"{rec['brand']} {rec['model']} {rec['item']}"
    rec["hotel"] = f"{rec['city2']} {_HOTEL[u[13] % len(_HOTEL)]}"
    return [group[alt][(x + alt) % len(group[alt])](rec, x) for group, x in zip(picks, u[_HEAD:])]


def _people(seed: int, n: int) -> np.ndarray:
    """Per person: first, last, middle initial (or -1), email style, domain, email number, user-id number."""
    salt = np.uint64((seed * 0xBF58476D1CE4E5B9) % 2**64)
    h = (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ salt
    h = (h ^ (h >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(29)
    part = lambda shift, mod: ((h >> np.uint64(shift)) % np.uint64(mod)).astype(np.int64)  # noqa: E731
    pid = np.arange(n, dtype=np.int64)
    initial = np.where(part(21, 2) == 1, part(16, 26), -1)
    # affine maps with a multiplier coprime to the modulus are bijections: unique per person
    return np.stack([part(0, len(_FIRST)), part(8, len(_LAST)), initial, part(24, 5), part(28, 3),
                     (pid * 7919 + seed * 31 + 3_141_593) % 10**7, (pid * 104729 + seed * 17 + 27_182_818) % 10**8], 1)


def _person(row) -> tuple[str, str, str]:
    """(name, email, user_id) from a row of ``_people``."""
    fi, la, ini, style, dom, num, uid = row
    first, last = _FIRST[fi], _LAST[la]
    name = f"{first} {chr(65 + ini)}. {last}" if ini >= 0 else f"{first} {last}"
    f, l_ = first.lower(), last.lower()
    local = (f"{f}.{l_}", f"{f[0]}{l_}", f"{f}_{l_}", f"{l_}.{f}", f"{f}{l_}")[style]
    return name, f"{local}{num}@{_DOMAINS[dom]}", f"u{uid:08d}"


# 40% of texts open naming the author, 70% sign with identifiers; "" is no prefix/suffix
_PREFIXES = ("Hi, this is {name}.", "Hello, {name} here, user ID {uid}.", "Hi team, writing from account {uid}.",
             "Dear support, my name is {name} and my email is {email}.", "Hi,", "Hello,", "Hi there,", "Hey team,",
             "Dear support,", "Good morning,", "", "", "", "")
_SUFFIXES = ("Thanks, {name}", "— {name} ({email})", "Regards, {name} ({uid})", "Cheers, {first}. Email: {email}",
             "Best, {name}", "{name}, {email}, {uid}", "Thanks, {name}", "Regards, {name}", "— {name}",
             "Best, {name} ({email})", "Thanks in advance.", "Any help appreciated.", "", "Thanks for reading.")


def _frame(u: list[int], person: tuple[str, str, str]) -> tuple[str, str]:
    """The prefix (greeting, maybe naming the author) and suffix (closing, maybe a signature)."""
    name, email, uid = person
    prefix, suffix = _PREFIXES[u[11] % len(_PREFIXES)], _SUFFIXES[u[12] % len(_SUFFIXES)]
    if "{" in prefix:
        prefix = prefix.format(name=name, email=email, uid=uid)
    if "{" in suffix:
        suffix = suffix.format(name=name, email=email, uid=uid, first=name.split()[0])
    return prefix, suffix


_FILLERS = "really just actually honestly also again now still literally basically even so then totally".split()


def _near_copy(body: str, target: float, orig: set[str], r: random.Random) -> tuple[str, float]:
    """Surface noise plus word edits until the Jaccard to ``orig`` is at most ``target``."""
    words = body.split(" ")
    for _ in range(1 + len(words) // 25):  # noise that normalisation removes
        i, op = r.randrange(len(words)), r.randrange(4)
        w = words[i]
        words[i] = (w.upper(), w.lower(), w.rstrip(".,") + "!!", w + " ")[op]  # " ": a double space
    j = _jaccard(orig, _shingles(" ".join(words)))
    for _ in range(40):
        if j <= target or len(words) < 8:
            break
        for _ in range(max(1, round(len(words) * (j - target) / (5 * (1 + target))))):  # ~5 shingles per edit
            i, op = r.randrange(len(words)), r.randrange(3)
            if op == 0:
                words[i] = r.choice(_FILLERS) if r.random() < 0.5 else r.choice(words)
            elif op == 1:
                del words[i]
            else:
                words.insert(i, r.choice(_FILLERS))
        j = _jaccard(orig, _shingles(" ".join(words)))
    return " ".join(words), j


# ---------------------------------------------------------------- the plan and the rows
@dataclass(frozen=True)
class _Plan:
    n: int
    seed: int
    author: np.ndarray  # per original: person index
    label: np.ndarray  # per original
    slot: np.ndarray  # per position: original index (>= 0) or -(copy index) - 1
    orig_pos: np.ndarray  # per original: position
    copy_pos: np.ndarray  # per copy: position
    copy_src: np.ndarray  # per copy: original index
    copy_kind: np.ndarray  # per copy: index into _KINDS
    is_source: np.ndarray  # per original: has copies
    sources: np.ndarray  # the originals that have copies, sorted
    source_rows: np.ndarray  # their random rows (copies re-derive their original from it)
    people: np.ndarray  # per person: a row of _people
    meta: dict
    width: int  # digits of the record ids

    def rid(self, pos: int) -> str:
        return f"r{pos:0{self.width}d}"

    def original(self, o: int, u: list[int], person: tuple | None = None) -> tuple[str, str, str, tuple]:
        """(prefix, suffix, body, (name, email, user_id)) of original ``o`` with random row ``u``."""
        person = person or _person(self.people[self.author[o]].tolist())
        return (*_frame(u, person), " ".join(_body(u, int(self.label[o]), 0)), person)

    def source_row(self, o: int) -> list[int]:
        return self.source_rows[np.searchsorted(self.sources, o)].tolist()


def _plan(n: int, seed: int, copy_rate: float, subject_rate: float, posts_per_person: float) -> _Plan:
    if n < 1 or seed < 0 or not 0 <= copy_rate < 0.5 or not 0 < subject_rate <= 1 or posts_per_person < 1:
        raise ValueError(f"bad demo parameters (n_records={n}, seed={seed}, copy_rate={copy_rate}, subject_rate="
                         f"{subject_rate}, posts_per_person={posts_per_person}); need n_records >= 1, seed >= 0, "
                         "0 <= copy_rate < 0.5, 0 < subject_rate <= 1, posts_per_person >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([seed, n, 0x5EED]))
    n_copies = round(n * copy_rate)
    n_orig = n - n_copies
    n_persons = max(1, int(n_orig / posts_per_person))
    author = np.concatenate([np.arange(n_persons), rng.integers(0, n_persons, n_orig - n_persons)])
    rng.shuffle(author)
    label = rng.choice(len(LABELS), n_orig, p=_LABEL_P)
    subjects = np.sort(rng.choice(n_persons, max(1, round(n_persons * subject_rate)), replace=False))
    pool = np.flatnonzero(np.isin(author, subjects))
    copy_src = pool[rng.integers(0, len(pool), n_copies)]
    counts = [round(n_copies * s) for s in _KIND_SHARE[:2]]
    copy_kind = np.repeat(np.arange(3), counts + [n_copies - sum(counts)])
    rng.shuffle(copy_kind)
    copy_pos = np.sort(rng.choice(n, n_copies, replace=False))
    slot = np.zeros(n, dtype=np.int64)
    slot[copy_pos] = -np.arange(1, n_copies + 1)
    orig_pos = np.flatnonzero(slot == 0)
    slot[orig_pos] = np.arange(n_orig)
    is_source = np.zeros(n_orig, dtype=bool)
    is_source[copy_src] = True
    meta = {"type": "meta", "n_records": n, "seed": seed, "copy_rate": copy_rate, "subject_rate": subject_rate,
            "posts_per_person": posts_per_person,
            "n_persons": n_persons, "n_subjects": len(subjects), "n_copies": n_copies,
            "kinds": {k: int((copy_kind == i).sum()) for i, k in enumerate(_KINDS)},
            "labels": list(LABELS), "shingle_k": 5,
            "normalization": "NFKC, casefold, each run of [\\W_] -> one space, strip; words split on spaces",
            "exact_copy": "text == original body: the original text minus its greeting/intro prefix and "
                          "closing/signature suffix (byte-identical to the original when it has neither)"}
    sources = np.flatnonzero(is_source)
    return _Plan(n, seed, author, label, slot, orig_pos, copy_pos, copy_src, copy_kind, is_source, sources,
                 _row(rng, len(sources)), _people(seed, n_persons), meta, max(7, len(str(n - 1))))


def _copy_text(plan: _Plan, j: int) -> tuple[str, float, int]:
    """(text, jaccard to the original, label) of copy ``j``."""
    o, kind = int(plan.copy_src[j]), _KINDS[plan.copy_kind[j]]
    u = plan.source_row(o)
    pre, suf, body, (name, email, uid) = plan.original(o, u)
    orig = _shingles(" ".join(t for t in (pre, body, suf) if t))
    r = random.Random(plan.seed * 0x9E3779B1 + j * 2 + 1 + (1 << 40))
    if kind == "exact":
        text = body
    elif kind == "near":  # keeps a greeting or closing that names nobody
        keep = [t for t in (pre, body, suf) if t and not any(x in t for x in (name.split()[0], email, uid))]
        target = r.uniform(0.8, 0.97) if r.random() < 0.75 else r.uniform(0.45, 0.8)
        return (*_near_copy(" ".join(keep), target, orig, r), int(plan.label[o]))
    else:
        sentences = _body(u, int(plan.label[o]), 1)
        text = " ".join(sentences[:1] + r.sample(sentences[1:], len(sentences) - 1))
    return text, _jaccard(orig, _shingles(text)), int(plan.label[o])


def _rows(plan: _Plan, start: int, stop: int) -> tuple[list[dict], list[tuple[int, float]]]:
    """Records at positions [start, stop), and (copy index, jaccard) of the copies among them."""
    batch = _row(np.random.default_rng([plan.seed, 2, start // _BATCH]), stop - start)
    rows, measured = [], []
    orig = np.maximum(plan.slot[start:stop], 0)
    columns = (plan.slot[start:stop], plan.is_source[orig], plan.label[orig], plan.people[plan.author[orig]], batch)
    for pos, s, is_src, label, person, u in zip(range(start, stop), *(c.tolist() for c in columns)):
        if s >= 0:
            pre, suf, body, (name, email, uid) = plan.original(s, plan.source_row(s) if is_src else u, _person(person))
            text = f"{pre} {body}" if pre else body
            rows.append({"id": plan.rid(pos), "text": f"{text} {suf}" if suf else text,
                         "label": label, "email": email, "user_id": uid, "name": name})
        else:
            text, jac, label = _copy_text(plan, -s - 1)
            measured.append((-s - 1, jac))
            rows.append({"id": plan.rid(pos), "text": text, "label": label,
                         "email": None, "user_id": None, "name": None})
    return rows, measured


def _truth(plan: _Plan, jaccards: dict[int, float]):
    """Ground-truth objects: meta, then one per person, then one per copy."""
    yield plan.meta
    copy_person = plan.author[plan.copy_src]
    groups = []
    for owner, pos in ((plan.author, plan.orig_pos), (copy_person, plan.copy_pos)):
        order = np.argsort(owner, kind="stable")
        groups.append((pos[order], np.searchsorted(owner[order], np.arange(len(plan.people) + 1))))
    (o_pos, o_b), (c_pos, c_b) = groups
    for pid, row in enumerate(plan.people.tolist()):
        name, email, uid = _person(row)
        yield {"type": "person", "person": pid, "name": name, "email": email, "user_id": uid,
               "originals": [plan.rid(p) for p in o_pos[o_b[pid]:o_b[pid + 1]].tolist()],
               "copies": [plan.rid(p) for p in c_pos[c_b[pid]:c_b[pid + 1]].tolist()]}
    copies = zip(plan.copy_pos.tolist(), plan.copy_src.tolist(), plan.copy_kind.tolist())
    for j, (pos, o, kind) in enumerate(copies):
        yield {"type": "copy", "id": plan.rid(pos), "original_id": plan.rid(int(plan.orig_pos[o])),
               "person": int(plan.author[o]), "kind": _KINDS[kind], "label": int(plan.label[o]),
               "jaccard": jaccards[j]}


# ---------------------------------------------------------------- public API
@dataclass(frozen=True)
class DemoDataset:
    records: list[dict]  # rows as written to records.jsonl
    persons: list[dict]  # {person, name, email, user_id, originals: [ids], copies: [ids]}
    copies: list[dict]  # {id, original_id, person, kind, label, jaccard}
    meta: dict


@dataclass(frozen=True)
class DemoFiles:
    records: Path
    ground_truth: Path
    n_records: int
    n_persons: int
    n_copies: int


def generate_demo(n_records: int, seed: int = 0, *, copy_rate: float = 0.03, subject_rate: float = 0.01,
                  posts_per_person: float = 4.0) -> DemoDataset:
    """The dataset in memory (for tests and small benchmarks; use ``write_demo`` for millions)."""
    plan = _plan(n_records, seed, copy_rate, subject_rate, posts_per_person)
    records, jaccards = [], {}
    for start in range(0, plan.n, _BATCH):
        rows, measured = _rows(plan, start, min(plan.n, start + _BATCH))
        records += rows
        jaccards.update(measured)
    truth = list(_truth(plan, jaccards))
    return DemoDataset(records, [t for t in truth if t["type"] == "person"],
                       [t for t in truth if t["type"] == "copy"], truth[0])


def write_demo(path_dir: str | Path, n_records: int, seed: int = 0, *, copy_rate: float = 0.03,
               subject_rate: float = 0.01, posts_per_person: float = 4.0, workers: int | None = None) -> DemoFiles:
    """Stream ``records.jsonl`` and ``ground_truth.jsonl`` into ``path_dir`` (created if needed).

    ``ground_truth.jsonl`` holds one ``{"type": "meta", ...}`` line, then one ``"person"`` line
    per person (ordered by person index), then one ``"copy"`` line per copy (ordered by id).
    ``workers`` processes render the rows; the bytes do not depend on it. By default up to 4 from
    50k records on, forked, and only in a process without other threads (forking those is unsafe;
    an explicit ``workers`` > 1 there uses spawn, which needs the ``__main__`` guard in scripts).
    Each file is written under a temporary name and renamed when complete.
    """
    plan = _plan(n_records, seed, copy_rate, subject_rate, posts_per_person)
    fork_ok = "fork" in mp.get_all_start_methods() and threading.active_count() == 1
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if n_records >= 50_000 and fork_ok else 1
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    jaccards: dict[int, float] = {}
    with _atomic(out / "records.jsonl") as f:
        starts = range(0, plan.n, _BATCH)
        if workers <= 1:
            for text, measured in map(partial(_encoded_batch, plan), starts):
                f.write(text)
                jaccards.update(measured)
        else:
            context = mp.get_context("fork" if fork_ok else "spawn")
            with ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(plan,)) as pool:
                for text, measured in pool.map(_encoded_batch, [None] * len(starts), starts):
                    f.write(text)
                    jaccards.update(measured)
    with _atomic(out / "ground_truth.jsonl") as f:
        for obj in _truth(plan, jaccards):
            f.write(_DUMPS(obj) + "\n")
    return DemoFiles(out / "records.jsonl", out / "ground_truth.jsonl", plan.n, len(plan.people),
                     len(plan.copy_pos))


@contextmanager
def _atomic(path: Path):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        yield f
    os.replace(tmp, path)


_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_WORKER: list = [None]  # in a worker process: the plan


def _init_worker(plan: _Plan) -> None:
    _WORKER[0] = plan


def _encoded_batch(plan: _Plan | None, start: int) -> tuple[str, list[tuple[int, float]]]:
    plan = plan or _WORKER[0]
    rows, measured = _rows(plan, start, min(plan.n, start + _BATCH))
    return "".join(map(_record_line, rows)), measured


def _record_line(r: dict, enc=json.encoder.encode_basestring) -> str:
    """The JSON line of a record, as ``_DUMPS`` would write it (faster)."""
    email, uid, name = ("null" if v is None else enc(v) for v in (r["email"], r["user_id"], r["name"]))
    return (f'{{"id":"{r["id"]}","text":{enc(r["text"])},"label":{r["label"]},'
            f'"email":{email},"user_id":{uid},"name":{name}}}\n')


def read_ground_truth(path: str | Path) -> dict:
    """``{"meta": {...}, "persons": [...], "copies": [...]}`` from a ground_truth.jsonl file."""
    result: dict = {"meta": None, "persons": [], "copies": []}
    with open(path, encoding="utf-8") as f:
        for obj in map(json.loads, f):
            if obj["type"] == "meta":
                result["meta"] = obj
            else:
                result["persons" if obj["type"] == "person" else "copies"].append(obj)
    return result

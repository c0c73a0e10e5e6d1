"""A small stand-in for the Stripe API endpoints localstripe lacks (Checkout, billing portal, prices) and for
event listing with `delivery_success`. It checks what Stripe documents (auth, API version, required and
allowed parameters, idempotency-key reuse with other parameters) and answers realistic objects.

With `hosts_checkout=True` it also serves the hosted Checkout page itself (for a browser): paying there
creates the subscription as Stripe would and queues the events Stripe then sends, in `events`."""

import html, itertools, re, secrets, time
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.routing import Route

from fh_saas.stripe_models import STRIPE_API_VERSION


def decode_form(body: str) -> dict:
    "Stripe's form encoding (`a[b][0][c]=v`) back into nested dicts and lists."
    root = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        parts = re.findall(r'^[^\[]+|(?<=\[)[^\]]*(?=\])', key)
        node = root
        for part, nxt in zip(parts, parts[1:] + [None], strict=True):
            if nxt is None:
                node[part] = value
            else:
                node = node.setdefault(part, {})

    def listify(x):
        if not isinstance(x, dict):
            return x
        x = {k: listify(v) for k, v in x.items()}
        return [x[k] for k in sorted(x, key=int)] if x and all(k.isdigit() for k in x) else x

    return listify(root)


class StripeError(Exception):
    def __init__(self, message, param=None, status=400, kind="invalid_request_error"):
        self.body, self.status = {"error": {"type": kind, "message": message, "param": param}}, status


def need(params, *names):
    for n in names:
        node = params
        for part in n.split('.'):
            node = node.get(part) if isinstance(node, dict) else None
        if node in (None, ''):
            raise StripeError(f"Missing required param: {n}.", n)


def only(params, allowed):
    if extra := set(params) - set(allowed):
        raise StripeError(f"Received unknown parameter: {sorted(extra)[0]}", sorted(extra)[0])


class FakeStripe:
    "State and routes of the stand-in; `calls` records (method, path, params, idempotency key) for assertions."

    def __init__(self, hosts_checkout: bool = False):
        self.calls, self.objects, self.events, self._idem = [], {}, [], {}
        self.hosts_checkout = hosts_checkout
        self.fail_next = 0
        self._n = itertools.count(1)

    def new_id(self, prefix):
        return f"{prefix}_{next(self._n):04d}{secrets.token_hex(4)}"

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route('/v1/customers', self.wrap(self.create_customer), methods=['POST']),
                Route('/v1/checkout/sessions', self.wrap(self.create_checkout), methods=['POST']),
                Route('/v1/billing_portal/sessions', self.wrap(self.create_portal), methods=['POST']),
                Route('/v1/products', self.wrap(self.create_product), methods=['POST']),
                Route('/v1/prices', self.wrap(self.create_price), methods=['POST']),
                Route('/v1/subscriptions', self.wrap(self.list_subscriptions), methods=['GET']),
                Route('/v1/subscriptions/{id}', self.wrap(self.subscription), methods=['GET', 'POST', 'DELETE']),
                Route('/v1/events', self.wrap(self.list_events), methods=['GET']),
                Route('/c/pay/{id}', self.checkout_page, methods=['GET', 'POST']),
            ]
        )

    def wrap(self, handler):
        async def endpoint(request):
            if request.headers.get('authorization') != 'Bearer sk_test_standin':
                return JSONResponse(
                    {"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}}, 401
                )
            if request.headers.get('stripe-version') != STRIPE_API_VERSION:
                return JSONResponse(
                    {"error": {"type": "invalid_request_error", "message": "unexpected Stripe-Version"}}, 400
                )
            body = (await request.body()).decode() if request.method == 'POST' else request.url.query
            params, key = decode_form(body), request.headers.get('idempotency-key')
            self.calls.append((request.method, request.url.path, params, key))
            if request.method == 'POST' and not key:
                return JSONResponse({"error": {"message": "no idempotency key"}}, 400)
            if self.fail_next:
                self.fail_next -= 1
                return JSONResponse(
                    {"error": {"type": "api_error", "message": "try again"}},
                    500,
                    headers={'Stripe-Should-Retry': 'true'},
                )
            if key and key in self._idem:
                seen_params, seen_path, response = self._idem[key]
                if (seen_params, seen_path) != (params, request.url.path):
                    return JSONResponse(
                        {
                            "error": {
                                "type": "idempotency_error",
                                "message": "Keys for idempotent requests can only be used with the "
                                "same parameters they were first used with.",
                            }
                        },
                        400,
                    )
                return JSONResponse(response, headers={'Idempotent-Replayed': 'true'})
            try:
                response = handler(request, params)
            except StripeError as e:
                return JSONResponse(e.body, e.status)
            if key and request.method in ('POST', 'DELETE'):
                self._idem[key] = (params, request.url.path, response)
            return JSONResponse(response)

        return endpoint

    def create_customer(self, request, p):
        only(p, ['name', 'email', 'metadata'])
        obj = dict(
            id=self.new_id('cus'),
            object='customer',
            name=p.get('name'),
            email=p.get('email'),
            metadata=p.get('metadata', {}),
        )
        self.objects[obj['id']] = obj
        return obj

    def create_checkout(self, request, p):
        only(
            p,
            [
                'mode',
                'customer',
                'client_reference_id',
                'metadata',
                'line_items',
                'success_url',
                'cancel_url',
                'subscription_data',
                'payment_intent_data',
            ],
        )
        need(p, 'mode', 'success_url', 'cancel_url', 'line_items')
        if p['mode'] not in ('payment', 'subscription'):
            raise StripeError("Invalid mode", 'mode')
        if p.get('customer') not in self.objects:
            raise StripeError(f"No such customer: '{p.get('customer')}'", 'customer')
        for i, li in enumerate(p['line_items']):
            if set(li) != {'price', 'quantity'}:
                raise StripeError(
                    "line_items need price and quantity (price_data would create a product)", f'line_items[{i}]'
                )
        if p['mode'] == 'subscription':
            only(p.get('subscription_data', {}), ['metadata', 'trial_period_days'])
            if 'payment_intent_data' in p:
                raise StripeError("payment_intent_data is only for payment mode", 'payment_intent_data')
            if (
                'trial_period_days' in p.get('subscription_data', {})
                and int(p['subscription_data']['trial_period_days']) < 1
            ):
                raise StripeError("trial_period_days must be at least 1", 'subscription_data[trial_period_days]')
        elif 'subscription_data' in p:
            raise StripeError("subscription_data is only for subscription mode", 'subscription_data')
        sid = self.new_id('cs_test')
        host = str(request.base_url).rstrip('/') if self.hosts_checkout else 'https://checkout.stripe.com'
        session = dict(
            id=sid,
            object='checkout.session',
            mode=p['mode'],
            customer=p['customer'],
            status='open',
            client_reference_id=p.get('client_reference_id'),
            metadata=p.get('metadata', {}),
            payment_status='unpaid',
            success_url=p['success_url'],
            cancel_url=p['cancel_url'],
            url=f"{host}/c/pay/{sid}",
        )
        self.objects[sid] = dict(session, line_items=p['line_items'], subscription_data=p.get('subscription_data', {}))
        return session

    async def checkout_page(self, request):
        "The hosted Checkout page: GET shows the session, POST pays it and returns to its success_url."
        session = self.objects.get(request.path_params['id'])
        if not (self.hosts_checkout and session and session['object'] == 'checkout.session'):
            return HTMLResponse('No such session', 404)
        if session['mode'] != 'subscription':
            return HTMLResponse('This stand-in completes subscription sessions only', 400)
        if request.method == 'POST':
            if session['status'] == 'open':
                self.complete_checkout(session['id'])
            return RedirectResponse(session['success_url'], 303)
        items = ''.join(
            f"<li>{html.escape(li['price'])} x {html.escape(li['quantity'])}</li>" for li in session['line_items']
        )
        return HTMLResponse(
            f"<h1>Stripe Checkout stand-in</h1><p>Session {html.escape(session['id'])}</p>"
            f"<ul>{items}</ul>"
            f"<form method='post'><button>Pay</button></form>"
        )

    def complete_checkout(self, sid):
        """Pay session `sid` in subscription mode: its subscription (trialing when the session asked for a trial) and
        the two events."""
        session, now = self.objects[sid], int(time.time())
        sub_data, li = session['subscription_data'], session['line_items'][0]
        trial = int(sub_data.get('trial_period_days', 0))
        sub = dict(
            id=self.new_id('sub'),
            object='subscription',
            customer=session['customer'],
            status='trialing' if trial else 'active',
            cancel_at_period_end=False,
            metadata=sub_data.get('metadata', {}),
            trial_end=now + trial * 86400 if trial else None,
            items=dict(
                object='list',
                data=[
                    dict(
                        id=self.new_id('si'),
                        object='subscription_item',
                        quantity=int(li['quantity']),
                        price=dict(id=li['price'], unit_amount=self.objects[li['price']]['unit_amount']),
                        current_period_start=now,
                        current_period_end=now + (trial or 30) * 86400,
                    )
                ],
            ),
        )
        self.objects[sub['id']] = sub
        session.update(
            status='complete', payment_status='no_payment_required' if trial else 'paid', subscription=sub['id']
        )
        public = {k: v for k, v in session.items() if k not in ('line_items', 'subscription_data')}
        for etype, obj in (('checkout.session.completed', public), ('customer.subscription.created', sub)):
            self.events.append(
                dict(
                    id=self.new_id('evt'),
                    object='event',
                    type=etype,
                    created=now,
                    livemode=False,
                    api_version=STRIPE_API_VERSION,
                    data=dict(object=obj),
                )
            )

    def create_portal(self, request, p):
        only(p, ['customer', 'return_url'])
        need(p, 'customer')
        if p['customer'] not in self.objects:
            raise StripeError(f"No such customer: '{p['customer']}'", 'customer')
        pid = self.new_id('bps')
        return dict(
            id=pid,
            object='billing_portal.session',
            customer=p['customer'],
            return_url=p.get('return_url'),
            url=f"https://billing.stripe.com/p/session/{pid}",
        )

    def create_product(self, request, p):
        only(p, ['name', 'metadata'])
        need(p, 'name')
        obj = dict(id=self.new_id('prod'), object='product', name=p['name'], metadata=p.get('metadata', {}))
        self.objects[obj['id']] = obj
        return obj

    def create_price(self, request, p):
        only(p, ['product', 'unit_amount', 'currency', 'recurring', 'lookup_key', 'metadata'])
        need(p, 'product', 'unit_amount', 'currency', 'recurring.interval')
        if p['product'] not in self.objects:
            raise StripeError(f"No such product: '{p['product']}'", 'product')
        if p['recurring']['interval'] not in ('day', 'week', 'month', 'year'):
            raise StripeError("bad interval", 'recurring[interval]')
        obj = dict(
            id=self.new_id('price'),
            object='price',
            product=p['product'],
            unit_amount=int(p['unit_amount']),
            currency=p['currency'],
            recurring=dict(interval=p['recurring']['interval']),
            lookup_key=p.get('lookup_key'),
        )
        self.objects[obj['id']] = obj
        return obj

    def add_subscription(self, sub_id, price, tenant_id, customer='cus_x', status='active', t=1_760_000_000):
        self.objects[sub_id] = dict(
            id=sub_id,
            object='subscription',
            customer=customer,
            status=status,
            cancel_at_period_end=False,
            metadata={'tenant_id': tenant_id},
            items=dict(
                object='list',
                data=[
                    dict(
                        id=f"si_{sub_id}",
                        object='subscription_item',
                        quantity=1,
                        price=dict(id=price, unit_amount=1000),
                        current_period_start=t,
                        current_period_end=t + 30 * 86400,
                    )
                ],
            ),
        )

    def subscription(self, request, p):
        sub = self.objects.get(request.path_params['id'])
        if sub is None:
            raise StripeError("No such subscription", 'id', 404)
        if request.method == 'DELETE':
            sub.update(status='canceled', ended_at=1_760_000_100)
        elif request.method == 'POST':
            only(p, ['items', 'proration_behavior', 'metadata', 'cancel_at_period_end'])
            if 'proration_behavior' in p and p['proration_behavior'] not in (
                'create_prorations',
                'always_invoice',
                'none',
            ):
                raise StripeError("bad proration_behavior", 'proration_behavior')
            for item in p.get('items', []):
                current = next((i for i in sub['items']['data'] if i['id'] == item.get('id')), None)
                if current is None:
                    raise StripeError("items need the id of an existing item to swap its price", 'items')
                current['price'] = dict(id=item['price'], unit_amount=2000)
            if 'cancel_at_period_end' in p:
                sub['cancel_at_period_end'] = p['cancel_at_period_end'] == 'true'
            sub['metadata'].update(p.get('metadata', {}))
        return sub

    def list_subscriptions(self, request, p):
        if p.get('status') != 'all':
            raise StripeError("this stand-in lists with status=all only", 'status')
        data = [o for o in self.objects.values() if o['object'] == 'subscription']
        return dict(object='list', url='/v1/subscriptions', data=data, has_more=False)

    def list_events(self, request, p):
        if p.get('delivery_success') != 'false':
            raise StripeError("this stand-in lists undelivered events only", 'delivery_success')
        gte = int(p['created']['gte'])
        data = [e for e in self.events if e['created'] >= gte]
        limit, after = int(p.get('limit', 10)), p.get('starting_after')
        if after:
            data = data[[e['id'] for e in data].index(after) + 1 :]
        return dict(object='list', url='/v1/events', data=data[:limit], has_more=len(data) > limit)

"""Criteo's official Python SDKs, used exactly as their documentation shows,
against `criteo-token-proxy --dev`.

The SDKs insist on fetching a token from `{host}/oauth2/token` with the
credentials they are given; the proxy answers that itself with a placeholder
naming a tenant, and adds the tenant's real token to every API call. So
dummy credentials work, a client id chooses the tenant, and the stand-in for
Criteo never sees a dummy credential or a placeholder.

Usage: test_sdk.py PATH_TO_BINARY (tests/sdk/run.sh installs the SDKs and
runs it).
"""

import datetime
import json
import os
import subprocess
import sys
import threading
import unittest
import urllib.request

from criteo_api_marketingsolutions_v2027_01 import ApiClientBuilder
from criteo_api_marketingsolutions_v2027_01.api.advertiser_api import AdvertiserApi
from criteo_api_marketingsolutions_v2027_01.api.analytics_api import AnalyticsApi
from criteo_api_marketingsolutions_v2027_01.api.gateway_api import GatewayApi
from criteo_api_marketingsolutions_v2027_01.model.statistics_report_query_message import (
    StatisticsReportQueryMessage,
)
from criteo_api_retailmedia_v2027_01 import ApiClientBuilder as RetailApiClientBuilder
from criteo_api_retailmedia_v2027_01.api.accounts_api import AccountsApi

# Credentials no one would have: the stand-in must never see them.
DUMMY_ID = "dummy-client-id-7c1e"
DUMMY_SECRET = "dummy-client-secret-51b0"
PLACEHOLDER = "criteo-token-proxy."


class Sandbox:
    """The real binary with `--dev` on loopback ports of its own choosing."""

    def __init__(self, binary):
        env = dict(os.environ)
        env.pop("CRITEO_PROXY_CONFIG", None)
        env.update(
            CRITEO_PROXY_SERVER__LISTEN="127.0.0.1:0",
            CRITEO_PROXY_SERVER__ADMIN_LISTEN="127.0.0.1:0",
            RUST_LOG="info",
        )
        self.process = subprocess.Popen(
            [binary, "--dev", "--log-format", "json"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.logs = []
        for line in self.process.stderr:
            self.logs.append(line)
            event = json.loads(line)
            if event["fields"].get("message") == "listening":
                self.url = "http://" + event["fields"]["proxy"]
                break
        else:
            raise RuntimeError("--dev ended before listening:\n" + "".join(self.logs))
        # Keep reading, so the process never blocks on a full pipe.
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self):
        for line in self.process.stderr:
            self.logs.append(line)

    def seen(self):
        """Every request the stand-in for Criteo received."""
        with urllib.request.urlopen(self.url + "/sandbox/seen", timeout=10) as r:
            return json.load(r)["requests"]

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)
        self.reader.join(timeout=5)
        self.process.stderr.close()
        if self.process.returncode != 0:
            raise RuntimeError(f"--dev exited with {self.process.returncode} on SIGTERM")


SANDBOX = None


def setUpModule():
    global SANDBOX
    SANDBOX = Sandbox(sys.argv[1])


def tearDownModule():
    SANDBOX.stop()


class MarketingSolutions(unittest.TestCase):
    def test_dummy_credentials_reach_the_default_tenant(self):
        client = ApiClientBuilder.WithClientCredentials(
            DUMMY_ID, DUMMY_SECRET, host=SANDBOX.url
        )
        advertisers = AdvertiserApi(client).list_advertisers()
        self.assertEqual(advertisers.data[0].type, "advertiser")
        self.assertEqual(advertisers.data[0].attributes.advertiser_name, "Sandbox Advertiser")
        app = GatewayApi(client).get_current_application()
        self.assertEqual(app.data.attributes.name, "criteo-token-proxy sandbox: demo")

    def test_a_client_id_chooses_the_tenant(self):
        for client_id in ("sandbox-acme-client", "acme"):
            client = ApiClientBuilder.WithClientCredentials(
                client_id, DUMMY_SECRET, host=SANDBOX.url
            )
            advertisers = AdvertiserApi(client).list_advertisers()
            self.assertEqual(
                advertisers.data[0].attributes.advertiser_name,
                "Acme Sandbox Advertiser",
                client_id,
            )
            app = GatewayApi(client).get_current_application()
            self.assertEqual(app.data.attributes.name, "criteo-token-proxy sandbox: acme")

    def test_the_refresh_token_builder_works_too(self):
        client = ApiClientBuilder.WithRefreshToken(
            DUMMY_ID, DUMMY_SECRET, "dummy-refresh-token", host=SANDBOX.url
        )
        advertisers = AdvertiserApi(client).list_advertisers()
        self.assertEqual(advertisers.data[0].attributes.advertiser_name, "Sandbox Advertiser")
        self.assertTrue(client.get_refresh_token().startswith(PLACEHOLDER))

    def test_a_statistics_report(self):
        client = ApiClientBuilder.WithClientCredentials(
            DUMMY_ID, DUMMY_SECRET, host=SANDBOX.url
        )
        query = StatisticsReportQueryMessage(
            advertiser_ids="12345",
            currency="EUR",
            dimensions=["AdvertiserId", "Day"],
            metrics=["Displays", "Clicks"],
            start_date=datetime.datetime(2026, 11, 1),
            end_date=datetime.datetime(2026, 11, 3),
            format="csv",
        )
        # The SDK writes the report to a temporary file and returns it open.
        report = AnalyticsApi(client).get_adset_report(statistics_report_query_message=query)
        with report:
            lines = report.read().decode().splitlines()
        os.unlink(report.name)
        self.assertEqual(lines[0], "AdvertiserId,Day,Currency,Displays,Clicks")
        self.assertEqual(len(lines), 4)


class RetailMedia(unittest.TestCase):
    def test_accounts_with_dummy_credentials(self):
        client = RetailApiClientBuilder.WithClientCredentials(
            DUMMY_ID, DUMMY_SECRET, host=SANDBOX.url
        )
        accounts = AccountsApi(client).get_accounts()
        account = accounts.data[0].attributes
        self.assertEqual(account.name, "Sandbox Retail Account")
        self.assertEqual(account.currency, "EUR")
        self.assertEqual(account.time_zone, "Europe/Paris")
        self.assertEqual(account.parent_account_label, "Sandbox Retailer")

    def test_a_client_id_chooses_the_tenant(self):
        client = RetailApiClientBuilder.WithClientCredentials(
            "sandbox-acme-client", DUMMY_SECRET, host=SANDBOX.url
        )
        accounts = AccountsApi(client).get_accounts(page_index=0, page_size=1)
        self.assertEqual(accounts.data[0].attributes.name, "Acme Brand")
        self.assertEqual(accounts.metadata.total_items_across_all_pages, 2)


class WhatCriteoSaw(unittest.TestCase):
    """Runs after the others (unittest orders classes by name)."""

    def test_no_dummy_credential_and_no_placeholder_reached_the_stand_in(self):
        seen = SANDBOX.seen()
        api_calls = [r for r in seen if r["path"] != "/oauth2/token"]
        self.assertGreaterEqual(len(api_calls), 9, "the calls above went through")
        text = json.dumps(seen)
        for secret in (DUMMY_ID, DUMMY_SECRET, "dummy-refresh-token", PLACEHOLDER):
            self.assertNotIn(secret, text)
        for call in api_calls:
            if call["path"].startswith("/sandbox/"):
                continue
            self.assertTrue(
                call["headers"]["authorization"].startswith("Bearer sandbox-access-"),
                call,
            )
        self.assertNotIn(DUMMY_SECRET, "".join(SANDBOX.logs), "nor the proxy's logs")
        token_requests = [r for r in seen if r["path"] == "/oauth2/token"]
        self.assertTrue(
            all("client_id=sandbox-" in r["body"] for r in token_requests),
            "only the proxy called the token endpoint, with the sandbox's own apps",
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    unittest.main(argv=sys.argv[:1], verbosity=2)

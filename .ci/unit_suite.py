"""Run test_ec2metaproxy without its end-to-end Docker classes (they need dockerd in a network
namespace, and .ci/run runs them once, on the default python3). Exit status as unittest's."""

import os
import sys
import unittest

END_TO_END = ("EndToEndDockerTest", "SetupFirewallTest")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import test_ec2metaproxy  # noqa: E402

suite = unittest.TestSuite()
for name in dir(test_ec2metaproxy):
    case = getattr(test_ec2metaproxy, name)
    if isinstance(case, type) and issubclass(case, unittest.TestCase) and name not in END_TO_END:
        suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(case))
if not any(hasattr(test_ec2metaproxy, name) for name in END_TO_END):
    sys.exit("unit_suite.py: none of %s in test_ec2metaproxy: update END_TO_END" % ", ".join(END_TO_END))
result = unittest.TextTestRunner(verbosity=2).run(suite)
sys.exit(0 if result.wasSuccessful() and result.testsRun else 1)

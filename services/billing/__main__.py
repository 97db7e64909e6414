from shared.runtime import main
from services.billing.app import SPEC

main(SPEC)

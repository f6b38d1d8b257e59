import { Button, CloseButton, Dialog, Field, Portal, Text, Textarea } from "@chakra-ui/react";
import { useState, type ReactNode } from "react";

export interface ConfirmProps {
  open: boolean;
  title: string;
  body: ReactNode;
  confirmLabel: string;
  danger?: boolean;
  /** Ask for a free-text reason (required when ``reasonRequired``). */
  reasonLabel?: string;
  reasonRequired?: boolean;
  onConfirm: (reason: string) => Promise<void>;
  onClose: () => void;
}

/** A confirmation dialog; errors from ``onConfirm`` stay in the dialog. */
export function ConfirmDialog(props: ConfirmProps) {
  const [reason, setReason] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);

  const close = () => {
    setReason("");
    setError(null);
    setBusy(false);
    props.onClose();
  };

  const confirm = async () => {
    setBusy(true);
    setError(null);
    try {
      await props.onConfirm(reason.trim());
      close();
    } catch (e) {
      setError((e as Error).message);
      setBusy(false);
    }
  };

  const missing = Boolean(props.reasonLabel && props.reasonRequired && !reason.trim());

  return (
    <Dialog.Root open={props.open} onOpenChange={(e) => !e.open && close()} role="alertdialog" size="md">
      <Portal>
        <Dialog.Backdrop />
        <Dialog.Positioner>
          <Dialog.Content data-testid="confirm-dialog">
            <Dialog.Header>
              <Dialog.Title>{props.title}</Dialog.Title>
            </Dialog.Header>
            <Dialog.Body>
              {props.body}
              {props.reasonLabel ? (
                <Field.Root mt={4} required={props.reasonRequired}>
                  <Field.Label>
                    {props.reasonLabel}
                    {props.reasonRequired ? <Field.RequiredIndicator /> : null}
                  </Field.Label>
                  <Textarea
                    data-testid="confirm-reason"
                    value={reason}
                    maxLength={500}
                    onChange={(e) => setReason(e.target.value)}
                    placeholder="e.g. node pool upgrade, back at 14:00"
                  />
                  <Field.HelperText>Shown to everyone on this page, in `agents list` and in the admin API.</Field.HelperText>
                </Field.Root>
              ) : null}
              {error ? (
                <Text mt={3} color="fg.error" data-testid="confirm-error">
                  {error}
                </Text>
              ) : null}
            </Dialog.Body>
            <Dialog.Footer>
              <Button variant="outline" onClick={close}>
                Cancel
              </Button>
              <Button
                data-testid="confirm-button"
                colorPalette={props.danger ? "red" : "blue"}
                loading={busy}
                disabled={missing}
                onClick={confirm}
              >
                {props.confirmLabel}
              </Button>
            </Dialog.Footer>
            <Dialog.CloseTrigger asChild>
              <CloseButton size="sm" />
            </Dialog.CloseTrigger>
          </Dialog.Content>
        </Dialog.Positioner>
      </Portal>
    </Dialog.Root>
  );
}
